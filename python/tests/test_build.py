"""scripts/build.py end to end on a tiny random Llama: artifact, generate, ppl, and its errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mlc_quant import artifact
from mlc_quant.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer without merges: 256 byte tokens (vocab of the tiny model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    assert len(vocab) == 256 <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-with-tokenizer")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    byte_tokenizer(256).save_pretrained(folder)
    return str(folder)


def build(model, out, scheme, *extra):
    return cli(["build", "--model", model, "--quantization", scheme, "--max-seq-len", "128",
                "--calib-samples", "3", "--calib-seq-len", "32", "--output", str(out), *extra])


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("builds") / "smq2"
    assert build(tiny_model, out, "smq_q8i8f16_2") == 0
    return out


def test_artifact_layout_and_config(built):
    names = sorted(os.listdir(built))
    for f in (artifact.LIB_FILE, artifact.PARAMS_FILE, artifact.CONFIG_FILE, "tokenizer.json"):
        assert f in names
    cfg = json.loads((built / artifact.CONFIG_FILE).read_text())
    assert cfg["quantization"]["scheme"] == "smq_q8i8f16_2" and cfg["quantization"]["smooth"]
    # qkv and gate/up of 2 layers, and the final norm into the untied lm_head
    assert cfg["quantization"]["smoothing_groups"]["norm"] == 5
    assert cfg["calibration"]["samples"] == 3
    params = artifact.load_safetensors(built / artifact.PARAMS_FILE)
    assert list(params) == cfg["params"]
    q = [n for n in params if n.endswith(".q")]
    assert len(q) == 2 * 7 + 1 and all(params[n].dtype == np.int8 for n in q)  # 7 linears a layer + lm_head
    # O(channels) statistics: a few float vectors per linear, however many tokens calibrated
    assert cfg["calibration"]["stats_bytes"] <= 3 * 4 * 15 * 128
    # no temporary directories left beside the output
    assert not [p for p in os.listdir(built.parent) if p.startswith(".")]


def test_generate_and_ppl_run_the_artifact(built, capsys):
    assert cli(["generate", str(built), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert cli(["ppl", str(built), "--text", "britannica", "--ctx", "64", "--max-windows", "2"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.strip().splitlines()[-1].split("perplexity:")[1])
    assert np.isfinite(ppl) and ppl > 1


def test_q0f32_build_matches_transformers_greedy(tiny_model, tmp_path):
    """The float build through scripts/build.py generates what transformers generates."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlc_quant.runner import load_built

    out = tmp_path / "f32"
    assert build(tiny_model, out, "q0f32") == 0
    engine, _, _ = load_built(out)
    prompt = [5, 17, 33, 101, 7]
    ours = list(engine.generate(prompt, 8))
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        gen = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    expected = gen[0, len(prompt):].tolist()
    expected = expected[: expected.index(2)] if 2 in expected else expected
    assert ours == expected


def test_scripts_build_command_line(tiny_model, tmp_path):
    """The documented entry point, as a user runs it."""
    out = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "build.py"), f"--model={tiny_model}",
           "--quantization=smq_q8i8f16_3", "--max-seq-len=128", "--dataset=dummy", "--calib-samples=2",
           "--calib-seq-len=16", f"--output={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / artifact.LIB_FILE).is_file()


def test_dtype_float16_cpu_build(tiny_model, built, tmp_path):
    """--dtype float16 on the CPU: the same plan (calibrated in fp32) replayed on an fp16 export,
    what a CUDA build computes; its logits stay close to the fp32 build's."""
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    out = tmp_path / "f16"
    assert build(tiny_model, out, "smq_q8i8f16_2", "--dtype", "float16") == 0
    cfg = json.loads((out / artifact.CONFIG_FILE).read_text())
    assert cfg["dtype"] == "float16" and cfg["target"] == "llvm"
    params = artifact.load_safetensors(out / artifact.PARAMS_FILE)
    assert params["model_layers_0_input_layernorm_weight"].dtype == np.float16
    assert params["model_layers_0_mlp_down_proj_weight.q"].dtype == np.int8
    prompt = [5, 17, 33, 101, 7, 250, 3, 9]
    ref = load_built(built)[0].prefill(prompt)
    got = load_built(out)[0].prefill(prompt).astype(np.float32)
    # fp16 activations move this tiny random W8A8 model's logits by a few % (requantization flips)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1
    from mlc_quant.build import BuildOptions, build_model  # pylint: disable=import-outside-toplevel

    with pytest.raises(ValueError, match="--dtype must be auto, float32 or float16"):
        build_model(BuildOptions(model=tiny_model, quantization="smq_q8i8f16_2", dtype="float64",
                                 output=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_keep_float_lm_head(tiny_model, built, tmp_path, capsys):
    """--keep-float lm_head: the head stays a float linear (no int8 params, not smoothed), the
    rest is quantized as before; the IR stays well formed and the artifact runs."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import resolve_keep_float  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.loader import load_config, load_params_dict  # pylint: disable=import-outside-toplevel

    out = tmp_path / "head-float"
    assert build(tiny_model, out, "smq_q8i8f16_2", "--keep-float", "lm_head") == 0
    cfg = json.loads((out / artifact.CONFIG_FILE).read_text())["quantization"]
    full = json.loads((built / artifact.CONFIG_FILE).read_text())["quantization"]
    assert cfg["keep_float"] == ["lm_head_weight"] and cfg["linears"] == full["linears"] - 1
    assert cfg["smoothing_groups"]["norm"] == full["smoothing_groups"]["norm"] - 1  # final norm untouched
    params = artifact.load_safetensors(out / artifact.PARAMS_FILE)
    assert params["lm_head_weight"].dtype == np.float32 and "lm_head_weight.q" not in params
    assert "model_layers_0_mlp_down_proj_weight.q" in params
    assert cli(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    # the pass-level API: patterns, tied heads, a pattern that matches nothing
    mc = load_config(tiny_model)
    ps = load_params_dict(tiny_model, mc)
    assert resolve_keep_float(("lm_head", "x"), {"model_embed_tokens_weight": 0}) == ("model_embed_tokens_weight", "x")
    mod, _ = export_model(mc, "float32", "llvm")
    res = pipeline.quantize_module(mod, ps, "smq_q8i8f16_3", calibrate=None, smooth=False,
                                   keep_float=("*down_proj*",))
    relax.analysis.well_formed(res.mod)
    assert not any("down_proj" in k and k.endswith(".q") for k in res.params)
    assert "model_layers_1_mlp_up_proj_weight.q" in res.params
    with pytest.raises(ValueError, match="matches no linear weight"):
        pipeline.quantize_module(mod, ps, "smq_q8i8f16_3", calibrate=None, smooth=False, keep_float=("nope*",))
    assert isinstance(res.mod, tvm.IRModule)


@pytest.mark.parametrize("case", ["exists", "dataset", "seq", "calib_seq", "arch", "tokenizer", "config", "scheme"])
def test_build_errors_are_clear_and_leave_nothing(case, tiny_model, tmp_path, capsys):
    model = tiny_model
    out = tmp_path / "out"
    extra = []
    scheme = "smq_q8i8f16_1"
    expect = {
        "exists": "exists; pass --overwrite",
        "dataset": "does not exist",
        "seq": "exceeds the model's maximum",
        "calib_seq": "--calib-seq-len=1000 must be at most the model's 256",
        "arch": "supported",
        "tokenizer": "no tokenizer",
        "config": "config.json",
        "scheme": "invalid choice",
    }[case]
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "dataset":
        extra = ["--dataset", str(tmp_path / "missing.txt")]
    elif case == "seq":
        extra = ["--max-seq-len", "100000"]
    elif case == "calib_seq":
        extra = ["--calib-seq-len", "1000"]  # build() passes 32 first: the last one wins
    elif case in ("arch", "tokenizer", "config"):
        model = str(tmp_path / "model")
        shutil.copytree(tiny_model, model)
        if case == "arch":
            cfg = json.loads(open(os.path.join(model, "config.json")).read())
            cfg["architectures"] = ["GPT2LMHeadModel"]
            cfg["model_type"] = "gpt2"
            open(os.path.join(model, "config.json"), "w").write(json.dumps(cfg))
        elif case == "tokenizer":
            for f in os.listdir(model):
                if f.startswith(("tokenizer", "special_tokens")):
                    os.remove(os.path.join(model, f))
        else:
            os.remove(os.path.join(model, "config.json"))
    elif case == "scheme":
        scheme = "smq_q4"
    if case == "scheme":
        with pytest.raises(SystemExit):
            build(model, out, scheme, *extra)
    else:
        assert build(model, out, scheme, *extra) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    if case == "exists":
        assert os.listdir(out) == ["keep.txt"]  # untouched
    else:
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left


def test_real_smollm2_w8a8_build_end_to_end(tmp_path, capsys):
    """The bundled SmolLM2, built W8A8 (smq_q8i8f16_3, smoothed) and run: it still knows things."""
    from mlc_quant.runner import load_built

    out = tmp_path / "smollm2"
    assert cli(["build", "--model", "smollm2", "--quantization", "smq_q8i8f16_3", "--dataset", "shakespeare",
                "--calib-samples", "2", "--calib-seq-len", "64", "--max-seq-len", "256", "--output", str(out)]) == 0
    engine, tokenizer, cfg = load_built(out)
    assert cfg["quantization"]["smoothing_groups"] == {"norm": 60, "linear": 30, "none": 30, "skip": 1}
    ids = tokenizer.encode("The capital of France is")
    text = tokenizer.decode(list(engine.generate(ids, 6)))
    assert "Paris" in text, text
    assert cli(["ppl", str(out), "--text", "britannica", "--ctx", "256", "--max-windows", "2"]) == 0
    ppl = float(capsys.readouterr().out.strip().splitlines()[-1].split("perplexity:")[1])
    assert 5 < ppl < 40, ppl  # fp32 gives ~19 on these windows
