"""The runnable example in docs/api.md runs, as a user would run it, and does what it says."""
import pathlib
import re
import subprocess
import sys


def test_api_doc_example_runs(tmp_path):
    text = (pathlib.Path(__file__).parents[2] / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## A runnable example")[1], re.S).group(1)
    script = tmp_path / "example.py"  # TVMScript reads the source, so run it from a real file
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("relative error:")[1]) < 0.02
