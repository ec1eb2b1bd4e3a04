"""mlc-quant eval (the quantization observatory) and the per-group alpha search, on tiny random Llamas."""
import json
import os
import shutil

import numpy as np
import pytest

from mlc_quant import artifact
from mlc_quant.cli import main as cli

from test_build import byte_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs! " * 3) * 4
CTX = 32
CALIB = ["--dataset", "dummy", "--calib-samples", "3", "--calib-seq-len", "32", "--calib-decode-steps", "2"]
SCHEMES = "q0f32,smq_q8i8f16_3@naive,smq_q8i8f16_0@search"


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-obs")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    byte_tokenizer(256).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return str(path)


def run_eval(model, text, out, schemes=SCHEMES, *extra):
    return cli(["eval", "--model", model, "--schemes", schemes, "--text", text, "--ctx", str(CTX),
                "--out", str(out), "--max-windows", "4", "--sample-rows", "512", *CALIB, *extra])


@pytest.fixture(scope="module")
def evaluated(tiny_model, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "obs"
    assert run_eval(tiny_model, text_file, out, SCHEMES, "--keep-builds") == 0
    return out


# ----------------------------------------------------------------------------- outputs


def test_eval_writes_json_markdown_and_figures(evaluated):
    result = json.loads((evaluated / "eval.json").read_text())
    labels = SCHEMES.split(",")
    assert list(result["perplexity"]) == labels
    assert all(np.isfinite(v) and v > 1 for v in result["perplexity"].values())
    # every quantized scheme has an error per linear (7 a layer x 2 layers + lm_head)
    assert set(result["layer_error"]) == set(labels[1:])
    for errs in result["layer_error"].values():
        assert len(errs) == 15 and all(0 < e < 0.3 for e in errs.values())
    # smoothing folds down_proj's 1/s into up_proj's rows: the error is against the smoothed float
    # linear, so up_proj's error is of gate_proj's order (same input, same scheme)
    errs = result["layer_error"]["smq_q8i8f16_0@search"]
    for i in range(2):
        up, gate = errs[f"model_layers_{i}_mlp_up_proj_weight"], errs[f"model_layers_{i}_mlp_gate_proj_weight"]
        assert up < 3 * gate
    md = (evaluated / "eval.md").read_text()
    for label in labels:
        assert f"| {label} |" in md
    for png in result["figures"]:
        assert (evaluated / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in md
    assert set(result["figures"]) == {"perplexity.png", "layer_errors.png", "activation_outliers.png",
                                      "group_alphas.png"}
    # the outlier picture: original, smoothed and rotated abs-max of up to 3 inputs
    stages = next(iter(result["activation_outliers"].values()))
    assert len(stages) == 3 and "original" in stages
    # nothing left beside the output
    assert not [p for p in os.listdir(evaluated.parent) if p.startswith(".")]


def test_eval_perplexity_equals_the_ppl_command(evaluated, text_file, capsys):
    from mlc_quant.runner import load_built, read_text

    result = json.loads((evaluated / "eval.json").read_text())
    for label in ("q0f32", "smq_q8i8f16_3@naive"):
        build = evaluated / "builds" / label.replace("@", "-")
        capsys.readouterr()
        assert cli(["ppl", str(build), "--text", text_file, "--ctx", str(CTX), "--max-windows", "4"]) == 0
        printed = float(capsys.readouterr().out.strip().splitlines()[-1].split("perplexity:")[1])
        assert printed == pytest.approx(result["perplexity"][label], abs=1e-4)
        # and exactly, through the engine the ppl command builds
        engine, tok, _ = load_built(build, max_seq_len=CTX)
        assert engine.perplexity(tok.encode(read_text(text_file))[: CTX * 4], CTX) == result["perplexity"][label]
    assert result["setup"]["windows"] == 4


def test_layer_error_matches_independent_numpy(evaluated, tiny_model):
    """smq_q8i8f16_3 without smoothing: the artifact's int8 weights, per-token int8 activations, on
    activations taken from the transformers model (not our capture) over the same calibration ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlc_quant.datasets import calibration_samples

    result = json.loads((evaluated / "eval.json").read_text())
    errs = result["layer_error"]["smq_q8i8f16_3@naive"]
    params = artifact.load_safetensors(evaluated / "builds" / "smq_q8i8f16_3-naive" / artifact.PARAMS_FILE)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids in calibration_samples("dummy", None, 256, 3, 32, seed=0):
            ref(torch.tensor(ids[None].astype(np.int64)))
    for h in hooks:
        h.remove()
    weights = dict(ref.named_parameters())
    checked = 0
    for module_name, xs in inputs.items():
        ours = module_name.replace(".", "_") + "_weight"
        x = torch.cat(xs).numpy().astype(np.float64)  # all 96 rows: --sample-rows 512 keeps them all
        w = weights[module_name + ".weight"].detach().numpy().astype(np.float64)
        s_x = np.maximum(np.abs(x).max(axis=1, keepdims=True) / 127, 1e-8)
        xq = np.clip(np.round(x / s_x), -127, 127) * s_x
        wq = params[f"{ours}.q"].astype(np.float64) * params[f"{ours}.scale"].astype(np.float64)[:, None]
        expected = np.linalg.norm(xq @ wq.T - x @ w.T) / np.linalg.norm(x @ w.T)
        assert errs[ours] == pytest.approx(expected, rel=2e-3), ours
        checked += 1
    assert checked == 15


# ----------------------------------------------------------------------------- alpha search


def test_alpha_search_matches_brute_force_numpy():
    """A tiny group with outlier channels: the grid alpha of lowest MSE, by hand."""
    from mlc_quant.alpha_search import search_group
    from mlc_quant.schemes import get_scheme

    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[:, [2, 9]] *= 40.0  # SmoothQuant's outlier channels
    ws = {"a": rng.standard_normal((8, 16)).astype(np.float32), "b": rng.standard_normal((12, 16)).astype(np.float32)}
    stats = {n: {"absmax": np.abs(x).max(axis=0)} for n in ws}
    grid = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]
    best, table = search_group(get_scheme("smq_q8i8f16_0"), ("a", "b"), x, ws, stats, grid)

    def mse(alpha):  # per-tensor symmetric int8 activations and weights, written out
        a = np.abs(x).max(axis=0).astype(np.float64)
        wmax = np.max([np.abs(w).max(axis=0) for w in ws.values()], axis=0).astype(np.float64)
        s = a ** alpha / wmax ** (1 - alpha)
        xs = x / s
        sx = np.abs(xs).max() / 127
        xq = np.clip(np.round(xs / sx), -128, 127) * sx
        err, n = 0.0, 0
        for w in ws.values():
            w_s = w * s
            sw = np.abs(w_s).max() / 127
            wq = np.clip(np.round(w_s / sw), -127, 127) * sw
            err += np.sum((xq @ wq.T - x.astype(np.float64) @ w.T.astype(np.float64)) ** 2)
            n += x.shape[0] * w.shape[0]
        return err / n

    brute = {a: mse(a) for a in grid}
    assert best == min(brute, key=brute.get)
    for a in grid:
        assert table[a] == pytest.approx(brute[a], rel=1e-3)
    assert brute[best] < brute[0.0]  # smoothing pays here


def test_alpha_search_never_worse_than_global_and_stored(evaluated):
    result = json.loads((evaluated / "eval.json").read_text())
    search = result["alpha_search"]["smq_q8i8f16_0@search"]
    cfg = json.loads((evaluated / "builds" / "smq_q8i8f16_0-search" / artifact.CONFIG_FILE).read_text())
    q = cfg["quantization"]
    assert q["alpha"] == "search" and q["group_alphas"] == search["group_alphas"]
    assert len(q["group_alphas"]) == 2 * 4 + 1  # qkv, o, gate/up, down per layer + final norm -> lm_head
    assert set(q["group_alphas"].values()) <= set(q["alpha_search"]["grid"])
    for g in q["alpha_search"]["groups"].values():
        assert g["mse"] <= g["mse_global"]
        assert g["mse"] == min(g["mse_grid"]) and g["alpha"] == q["alpha_search"]["grid"][g["mse_grid"].index(g["mse"])]
    objectives = [g["objective"] for g in q["alpha_search"]["groups"].values()]
    assert objectives.count("block") == 8 and objectives.count("group") == 1  # lm_head's group: no block
    assert search["mse_sum"] <= search["mse_sum_global"]
    assert 0.5 in q["alpha_search"]["grid"]


def test_block_objective_matches_transformers(evaluated, tiny_model):
    """The block objective of layer 0's down_proj group, recomputed with the transformers model:
    layer 0's output with down_proj smoothed and W8A8 per-tensor quantized (by hand) vs float."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlc_quant.datasets import calibration_samples

    q = json.loads((evaluated / "builds" / "smq_q8i8f16_0-search" / artifact.CONFIG_FILE).read_text())["quantization"]
    grid = q["alpha_search"]["grid"]
    got = q["alpha_search"]["groups"]["model_layers_0_mlp_down_proj_weight"]
    assert got["objective"] == "block"
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    ids = torch.tensor(np.stack(list(calibration_samples("dummy", None, 256, 3, 32, seed=0))).astype(np.int64))
    down = ref.model.layers[0].mlp.down_proj
    seen = []
    hook = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        h_float = ref(ids, output_hidden_states=True).hidden_states[1]
    hook.remove()
    a_max = torch.cat(seen).abs().amax(0).double().numpy()  # the calibration abs-max (same tokens)
    w = down.weight.detach().double().numpy().copy()
    expected = []
    for alpha in grid:
        s = a_max ** alpha / np.abs(w).max(0) ** (1 - alpha)
        sx = (a_max / s).max() / 127
        w_s = w * s
        sw = np.abs(w_s).max() / 127
        wq = np.clip(np.round(w_s / sw), -127, 127) * sw

        def quant_input(m, a, s=s, sx=sx):
            x = a[0].double() / torch.from_numpy(s)
            return (torch.clamp(torch.round(x / sx), -128, 127) * sx).float()

        hook = down.register_forward_pre_hook(quant_input)
        down.weight.data = torch.from_numpy(wq).float()
        with torch.no_grad():
            h_q = ref(ids, output_hidden_states=True).hidden_states[1]
        hook.remove()
        down.weight.data = torch.from_numpy(w).float()
        expected.append(float(((h_q - h_float).double() ** 2).mean()))
    np.testing.assert_allclose(got["mse_grid"], expected, rtol=5e-2)
    assert got["alpha"] == grid[int(np.argmin(expected))]


def test_group_alphas_round_trip_through_the_config(evaluated, tiny_model, tmp_path):
    """--alpha <config> rebuilds the searched model exactly, without searching again."""
    from mlc_quant.alpha_search import load_group_alphas

    searched = evaluated / "builds" / "smq_q8i8f16_0-search"
    alphas = load_group_alphas(searched / artifact.CONFIG_FILE)
    assert alphas == json.loads((searched / artifact.CONFIG_FILE).read_text())["quantization"]["group_alphas"]
    out = tmp_path / "again"
    assert cli(["build", "--model", tiny_model, "--quantization", "smq_q8i8f16_0", "--max-seq-len", str(CTX),
                "--output", str(out), "--alpha", str(searched), *CALIB]) == 0
    cfg = json.loads((out / artifact.CONFIG_FILE).read_text())
    assert cfg["quantization"]["alpha"] == "per-group" and cfg["quantization"]["group_alphas"] == alphas
    a = artifact.load_safetensors(searched / artifact.PARAMS_FILE)
    b = artifact.load_safetensors(out / artifact.PARAMS_FILE)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_pipeline_applies_per_group_alpha(rng):
    """quantize_module with {group: alpha} smooths each group with its own alpha."""
    from mlc_quant.smoothing import group_alpha, plan_smoothing, smoothing_factors
    from mlc_quant.passes import SmoothGroup

    g1, g2 = SmoothGroup(("b", "a"), "norm", ("n1",)), SmoothGroup(("c",), "none")
    stats = {n: {"absmax": np.abs(rng.standard_normal(4)) + 0.1} for n in "abc"}
    params = {n: rng.standard_normal((3, 4)) for n in "abc"}
    alphas = {"a,b": 0.3, "c": 0.8}
    f = plan_smoothing([g1, g2], stats, params, dict.fromkeys("abc", True), alphas)
    np.testing.assert_allclose(f[("c",)], smoothing_factors(stats["c"]["absmax"], [params["c"]], 0.8))
    act = np.maximum(stats["a"]["absmax"], stats["b"]["absmax"])
    np.testing.assert_allclose(f[("b", "a")], smoothing_factors(act, [params["b"], params["a"]], 0.3))
    with pytest.raises(ValueError, match="lack smoothing group"):
        group_alpha({"x": 0.5}, ("c",))


# ----------------------------------------------------------------------------- pieces


def test_capture_pass_is_well_formed_and_exact(tiny_model):
    """CaptureInputs returns each linear input; rows equal the float activations (x @ W^T check)."""
    import tvm

    from mlc_quant.capture import CaptureModule, build_capture_module, capture_activations
    from mlc_quant.model.llama import export_model
    from mlc_quant.model.loader import load_config, load_params_dict
    from mlc_quant.passes import AnnotateLinear
    from mlc_quant.passes.capture_inputs import CAPTURES_ATTR, CaptureInputs

    config = load_config(tiny_model)
    mod, _ = export_model(config, "float32", "llvm")
    params = load_params_dict(tiny_model, config, "float32")
    cap = CaptureInputs()(AnnotateLinear(weight_names=list(params))(mod))
    tvm.relax.analysis.well_formed(cap)  # raises on the first violation
    keys = [str(k) for k in cap["prefill"].attrs[CAPTURES_ATTR]]
    assert len(keys) == 2 * 4 + 1 and "model_layers_0_mlp_gate_proj_weight,model_layers_0_mlp_up_proj_weight" in keys
    compiled = build_capture_module(mod, list(params))
    assert isinstance(compiled, CaptureModule)
    ids = [np.arange(20, dtype=np.int32) + 3, np.arange(20, dtype=np.int32) + 40]
    got = capture_activations(mod, params, ids, 2, max_rows=7, compiled=compiled, max_seq_len=32)
    assert got.tokens == 40 and all(v.shape[0] == 7 for v in got.rows.values())
    x = got.rows[got.key_of("model_layers_0_self_attn_q_proj_weight")]
    assert x.shape[1] == 64 and np.isfinite(x).all()
    assert np.all(np.abs(x) <= got.absmax[got.key_of("model_layers_0_self_attn_q_proj_weight")] + 1e-6)


def test_fakequant_static_asym_matches_hand_written():
    from mlc_quant.fakequant import dequantize_weight, quantize_act
    from mlc_quant.schemes import get_scheme

    rng = np.random.default_rng(1)
    scheme = get_scheme("smq_q8i8f16_2")
    x = rng.standard_normal((10, 6)).astype(np.float32) + 0.7
    stats = {"absmax": np.abs(x).max(0), "min": x.min(0), "max": x.max(0)}
    act = scheme.act_qparams(stats)
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    s = (hi - lo) / 255
    zp = int(np.clip(np.round(-128 - lo / s), -128, 127))
    np.testing.assert_allclose(quantize_act(scheme, x, act),
                               (np.clip(np.round(x / s) + zp, -128, 127) - zp) * s, rtol=1e-5, atol=1e-6)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    deq = dequantize_weight(scheme, "w", scheme.quantize_weight("w", w, act), 6, act)
    lo_w, hi_w = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    assert np.abs(deq - w).max() <= ((hi_w - lo_w) / 255).max() * 0.5 + 1e-6


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case", ["scheme", "text", "ctx", "spec", "exists"])
def test_eval_errors_are_clear_and_leave_nothing(case, tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "obs"
    schemes, text, extra = "q0f32,smq_q8i8f16_3", text_file, ["--ctx", str(CTX)]
    expect = {"scheme": "unknown quantization scheme 'smq_nope'", "text": "not found",
              "ctx": "exceeds the model's maximum context 256", "spec": "after '@'",
              "exists": "exists; pass --overwrite"}[case]
    if case == "scheme":
        schemes = "q0f32,smq_nope"
    elif case == "text":
        text = str(tmp_path / "missing.txt")
    elif case == "ctx":
        extra = ["--ctx", "4096"]
    elif case == "spec":
        schemes = "smq_q8i8f16_0@sometimes"
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
    assert cli(["eval", "--model", tiny_model, "--schemes", schemes, "--text", text, "--out", str(out),
                *CALIB, *extra]) == 2
    assert expect in capsys.readouterr().err
    if case == "exists":
        assert os.listdir(out) == ["keep"]
    else:
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_eval_failure_midway_leaves_no_partial_dir(tiny_model, text_file, tmp_path, monkeypatch):
    from mlc_quant import build

    def boom(*_a, **_k):
        raise RuntimeError("simulated failure during a build")

    monkeypatch.setattr(build, "build_model", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        cli(["eval", "--model", tiny_model, "--schemes", "q0f32", "--text", text_file, "--ctx", str(CTX),
             "--out", str(tmp_path / "obs"), "--plot-rotation", "none", *CALIB])
    assert os.listdir(tmp_path) == []


def test_fakequant_w4_dequantize_matches_the_group_quantizer():
    from mlc_quant.fakequant import dequantize_weight
    from mlc_quant.schemes import get_scheme
    from mlc_quant.schemes_w4 import dequantize_groups_np

    rng = np.random.default_rng(2)
    scheme = get_scheme("q4f16_rtn")
    w = rng.standard_normal((6, 200)).astype(np.float32)  # K not a multiple of the group (128)
    q, scale, zp = scheme.quantize_groups(w)
    np.testing.assert_array_equal(dequantize_weight(scheme, "x_weight", scheme.quantize_weight("x_weight", w, None), 200),
                                  dequantize_groups_np(q, scale, zp, 200))
    head = dequantize_weight(scheme, "lm_head_weight", scheme.quantize_weight("lm_head_weight", w, None), 200)
    assert np.abs(head - w).max() <= (np.abs(w).max(1) / 127).max() * 0.5 + 1e-6  # int8 per-channel head


def test_build_rejects_a_bad_alpha(tiny_model, tmp_path, capsys):
    for alpha, msg in (("1.5", "must be in [0, 1]"), (str(tmp_path / "nope.json"), "alpha file"),
                       ("search2", "alpha file")):
        assert cli(["build", "--model", tiny_model, "--quantization", "smq_q8i8f16_1", "--output",
                    str(tmp_path / "out"), "--max-seq-len", "64", "--alpha", alpha, *CALIB]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
