"""The runnable example in docs/api.md runs and does what it says."""
import pathlib
import re


def test_api_doc_example_runs(capsys):
    text = (pathlib.Path(__file__).parents[2] / "docs" / "api.md").read_text()
    example = text.split("## A runnable example")[1]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    exec(compile(code, "docs/api.md", "exec"), {})
    err = float(capsys.readouterr().out.split("relative error:")[1])
    assert err < 0.02
