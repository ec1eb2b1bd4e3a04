"""CUDA builds of whole models (`scripts/build.py --target cuda`) and running them on a GPU.

CPU, in CI (needs nvcc and the full TVM; no GPU):
  * a tiny Llama exported in fp16 for CUDA, for q0f16 and the W8A8 schemes, goes through
    dispatch_gemms(strict=True): every GEMM is an external kernel, none is left to TVM; the rest
    gets TVM's GPU schedules (dlight) and the exported library carries a fatbin of TVM's kernels
    compiled here (no compiler needed where it runs);
  * `mlc-quant build --target cuda` on that tiny model (calibrating on its CPU build) writes an
    fp16 artifact whose library holds the kernels and a fatbin;
  * the runtime side (runner, cuda_runtime) imports without tvm.relax.
GPU (skipped without a CUDA device; run on the GPU machine with the runtime-only TVM):
  * the tiny W8A8 CUDA build (fatbin, and a CUDA-source variant compiled at load time by the
    callback prepare_cuda_runtime registers) gives the CPU build's greedy tokens and logits;
  * the SmolLM2 W8A8 (smq_q8i8f16_2) CUDA build generates the CPU build's 32 greedy tokens and
    its perplexity is within 0.5 % of the CPU build's (the issue's target; on an H100, 2026-11-26,
    it is missed: +0.88 % ppl and tokens diverging at the 2nd token, from fp16 versus fp32
    activations, see docs/performance.md; the tiny model's CUDA build equals its fp16 CPU build
    bit for bit).
  The expected values are computed here, on the CPU builds (`make-gpu-bundle`, below), and the
  GPU tests read them from MLC_QUANT_GPU_BUNDLE.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from typing import Sequence
from pathlib import Path

import numpy as np
import pytest

from mlc_quant.compare import EMBED, first_difference, greedy_tokens, teacher_forced, ulp_nudged, window_choices  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # little-endian 0xBA55ED50
GREEDY_TOKENS = 32
PPL_REL_TOL = 0.005
TIE_MARGIN = 0.5  # logits: CPU top-2 gaps below this may flip under fp16 activations


def _full_tvm() -> bool:
    try:
        import tvm.relax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except Exception:  # pylint: disable=broad-except
        return False
    return True


def _nvcc() -> bool:
    if not _full_tvm():
        return False
    from mlc_quant.kernels import find_nvcc  # pylint: disable=import-outside-toplevel

    return find_nvcc() is not None


needs_build = pytest.mark.skipif(not _nvcc(), reason="needs nvcc (CUDA toolkit) and the full TVM")


def _gpu() -> bool:
    try:
        from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

        prepare_cuda_runtime()
        return True
    except Exception:  # pylint: disable=broad-except
        return False


def _bundle() -> Path | None:
    d = os.environ.get("MLC_QUANT_GPU_BUNDLE")
    return Path(d) if d and Path(d).is_dir() else None


# =============================================================================================
# CPU: compile for CUDA here


def _tiny_config():
    from conftest import TINY  # pylint: disable=import-outside-toplevel

    from mlc_quant.model.config import LlamaConfig  # pylint: disable=import-outside-toplevel

    fields = LlamaConfig.__dataclass_fields__
    return LlamaConfig(**{k: v for k, v in TINY.items() if k in fields})


def _cuda_entries(ex, archs=("sm_90",)):
    """The packed imports of an executable after compile_device_code: [(kind, fmt, code)]."""
    from tvm.runtime import _ffi_api  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    blob = _ffi_api.ModulePackImportsToTensor(ex.mod).numpy().tobytes()
    row_ptr, child, entries = cd.parse_library_blob(blob)
    assert cd.write_library_blob(row_ptr, child, entries) == blob  # the parser round-trips
    compiled = cd.compile_device_code(blob, archs)
    out = []
    for kind, payload in cd.parse_library_blob(compiled)[2]:
        if kind == "cuda":
            fmt, _, code = cd.split_cuda_payload(payload)
            out.append((kind, fmt, code))
    return out


@needs_build
@pytest.mark.parametrize("scheme", ["q0f16", "smq_q8i8f16_2", "smq_q8i8f16_3"])
def test_tiny_llama_cuda_build_offloads_every_gemm(scheme, tmp_path):
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    config = _tiny_config()
    mod, names = export_model(config, "float16", target)
    s = get_scheme(scheme)
    qmod = synthetic_plan(mod, names, s).apply(mod) if s.quantizes else mod
    dmod = cd.dispatch_gemms(qmod, strict=True)  # raises if any matmul is left to TVM
    n_linears = 7 * config.num_hidden_layers + 1
    for fn in ("prefill", "decode"):
        calls = []
        relax.analysis.post_order_visit(
            dmod[fn],
            lambda e: calls.append(str(e.args[0].global_symbol))
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_dps_packed"
            and str(e.args[0].global_symbol).endswith(("mlc_cutlass", "mlc_cublaslt")) else None,
        )
        assert len(calls) == n_linears, (fn, calls)
        want = "mlc_cublaslt" if scheme == "q0f16" else "mlc_cutlass"
        assert all(c.endswith(want) for c in calls)
    ex = tvm.compile(dmod, target)
    # TVM's own kernels (norms, rotary, attention, quantize glue) are scheduled for the GPU and
    # none of them is a GEMM; they ship as one fatbin compiled here.
    entries = _cuda_entries(ex)
    assert len(entries) == 1 and entries[0][1] == "fatbin" and entries[0][2][:4] == FATBIN_MAGIC
    lib = pipeline_export(pipeline, ex, tmp_path / "model.so", target)
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    assert "__tvm_ffi_mlcq_linear" in nm and "__tvm_ffi__library_bin" in nm
    data = Path(lib).read_bytes()
    assert b"\x06\x00\x00\x00\x00\x00\x00\x00fatbin" in data and b'extern "C" __global__' not in data


def pipeline_export(pipeline, ex, path, target) -> str:
    pipeline.export_library(ex, str(path), target)
    return str(path)


@needs_build
def test_build_cli_cuda_target(tiny_llama_dir, tmp_path, caplog):
    """`mlc-quant build --target cuda`: calibrates on the CPU build, writes an fp16 CUDA artifact."""
    from test_build import byte_tokenizer  # pylint: disable=import-outside-toplevel

    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel
    from mlc_quant.cli import main as cli  # pylint: disable=import-outside-toplevel

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    byte_tokenizer(256).save_pretrained(model)
    out = tmp_path / "cuda"
    with caplog.at_level(logging.INFO):
        assert cli(["build", "--model", str(model), "--quantization", "smq_q8i8f16_2", "--target", "cuda",
                    "--max-seq-len", "128", "--calib-samples", "2", "--calib-seq-len", "32",
                    "--output", str(out)]) == 0
    assert "not offloaded" not in caplog.text
    cfg = json.loads((out / artifact.CONFIG_FILE).read_text())
    assert cfg["target"] == "cuda" and cfg["dtype"] == "float16"
    assert len(cfg["merged_linears"]) == 2 * cfg["model_config"]["num_hidden_layers"]  # q/k/v, gate/up
    params = artifact.load_safetensors(out / artifact.PARAMS_FILE)
    assert sorted(params) == sorted(cfg["params"]) and "model_layers_0_self_attn_qkv_proj_weight.q" in params
    assert {str(v.dtype) for k, v in params.items() if not k.endswith((".q", ".scale", ".zp", ".corr"))} == {"float16"}
    data = (out / artifact.LIB_FILE).read_bytes()
    assert b"\x06\x00\x00\x00\x00\x00\x00\x00fatbin" in data

    # --dtype float32: the same plan with fp32 activations (what the fp32 CPU build computes); every
    # GEMM is still offloaded (int8 GEMMs dequantize to fp32 through cuBLASLt + the epilogue kernel)
    out32 = tmp_path / "cuda32"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli(["build", "--model", str(model), "--quantization", "smq_q8i8f16_3", "--target", "cuda",
                    "--dtype", "float32", "--max-seq-len", "128", "--calib-samples", "2", "--calib-seq-len", "32",
                    "--output", str(out32)]) == 0
    assert "not offloaded" not in caplog.text
    cfg = json.loads((out32 / artifact.CONFIG_FILE).read_text())
    assert cfg["target"] == "cuda" and cfg["dtype"] == "float32"
    params = artifact.load_safetensors(out32 / artifact.PARAMS_FILE)
    assert {str(v.dtype) for k, v in params.items() if not k.endswith((".q", ".scale", ".zp", ".corr"))} == {"float32"}


def test_runtime_side_imports_without_relax():
    """What the GPU machine imports (runner, runtime, cuda_runtime, bench) must not need tvm.relax."""
    code = (
        "import sys\n"
        "import mlc_quant, mlc_quant.runner, mlc_quant.runtime, mlc_quant.cuda_runtime, mlc_quant.artifact\n"
        "import mlc_quant.compare\n"
        "import mlc_quant.bench\n"
        "bad = [m for m in ('mlc_quant.api', 'mlc_quant.pipeline', 'mlc_quant.passes') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]


# =============================================================================================
# GPU: built here (make-gpu-bundle), run there


needs_gpu = pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU")
needs_bundle = pytest.mark.skipif(_bundle() is None, reason="set MLC_QUANT_GPU_BUNDLE to make-gpu-bundle's output")


@needs_gpu
@needs_bundle
@pytest.mark.parametrize("variant", ["cuda", "cuda_src", "cuda32"])
def test_gpu_tiny_w8a8_build_matches_cpu_build(variant):
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    d = _bundle() / "tiny"
    if not (d / variant).is_dir():
        pytest.skip(f"{variant} not in the bundle")
    expect = json.loads((d / "expect.json").read_text())
    engine, _, _ = load_built(d / variant, device="cuda")
    logits = engine.prefill(expect["prompt"])
    tokens = list(engine.generate(expect["prompt"], len(expect["tokens"])))
    ref = np.load(d / "cpu_logits.npy")  # the CPU build (fp32)
    rel = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
    rel16 = None
    if (d / "cpu_fp16_logits.npy").is_file():  # the same plan built for the CPU in fp16
        ref16 = np.load(d / "cpu_fp16_logits.npy")
        rel16 = float(np.linalg.norm(logits - ref16) / np.linalg.norm(ref16))
    print(json.dumps({"variant": variant, "rel_vs_cpu_fp32": rel, "rel_vs_cpu_fp16": rel16, "tokens": tokens}))
    assert tokens == expect["tokens"]
    if variant == "cuda32":  # fp32 activations: the CPU build's computation up to summation order
        assert rel < 1e-3, rel
        return
    # fp16 activations move this tiny W8A8 model's logits by 4.1 % on the CPU too (TVM's llvm
    # build in fp16 vs fp32, same plan). The CUDA build computes RMSNorm and SiLU * up on
    # norm_act.cu, in fp32 with one rounding where TVM's fp16 IR rounds SiLU and the product
    # separately, and this model's static int8 bins amplify such 1-ulp differences: 1.3 % from
    # the fp16 CPU build on the H200 (0.0 with MLC_QUANT_NORM_ACT=tvm, i.e. TVM's kernels:
    # docs/performance.md). So: close to the fp16 computation, and no farther from the fp32 one.
    assert rel < 6e-2, rel
    if rel16 is not None:
        assert rel16 < 2e-2, rel16
        rel16_cpu = float(np.linalg.norm(ref16 - ref) / np.linalg.norm(ref))
        assert rel <= 1.05 * rel16_cpu, (rel, rel16_cpu)


@needs_gpu
@needs_bundle
@pytest.mark.parametrize("variant", ["cuda", "cuda32"])
def test_gpu_smollm2_w8a8_matches_cpu_build(variant):
    """The SmolLM2 W8A8 CUDA build against its (fp32) CPU build: perplexity within 0.5%, and the
    next-token choice at each of the 2047 scored positions of the perplexity text. ``cuda32``
    (``--dtype float32``) must agree with the CPU build as often as the CPU build agrees with itself
    when its input moves by one ulp (the floor, measured by make-gpu-bundle); ``cuda`` (fp16) may
    flip only choices with a top-2 gap below 2 logits. One 32-token greedy path is reported."""
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    d = _bundle() / "smollm2"
    if not (d / variant).is_dir():
        pytest.skip(f"SmolLM2 {variant} build not in the bundle")
    assemble_smollm2_params(d, variant)
    expect = json.loads((d / "expect.json").read_text())
    engine, _, cfg = load_built(d / variant, device="cuda", max_seq_len=expect["ctx"])
    tokens = greedy_tokens(engine, expect["prompt"], GREEDY_TOKENS)
    forced, _ = teacher_forced(engine, expect["prompt"], expect["tokens"])
    ppl, argmax, _ = window_choices(engine, expect["ppl_ids"], expect["ctx"])
    margins = expect.get("margins")
    ref, floor = expect["choices"], expect["ulp_floor"]
    disagree = [m for a, b, m in zip(argmax, ref["argmax"], ref["margins"]) if a != b]
    result = {"variant": variant, "dtype": cfg["dtype"], "ppl": ppl,
              "choices_agree": len(argmax) - len(disagree), "choices": len(argmax),
              "choices_max_disagree_margin": max(disagree, default=0.0),
              "ulp_floor_agree": floor["agree"], "ulp_floor_ppl": floor["ppl"],
              "ulp_floor_max_disagree_margin": max(floor["disagree_margins"], default=0.0), "tokens": tokens,
              "cpu_tokens": expect["tokens"], "cpu_ppl": expect["ppl"],
              "ppl_rel_diff": abs(ppl - expect["ppl"]) / expect["ppl"],
              "free_running_equal_steps": first_difference(tokens, expect["tokens"]),
              "teacher_forced_agree": sum(a == b for a, b in zip(forced, expect["tokens"])),
              "teacher_forced_disagree_at": [(i, margins[i] if margins else None)
                                             for i, (a, b) in enumerate(zip(forced, expect["tokens"])) if a != b]}
    f16 = expect.get("fp16")
    if f16:
        result.update({"cpu_fp16_tokens": f16["tokens"], "cpu_fp16_ppl": f16["ppl"],
                       "cpu_fp16_vs_fp32_equal_steps": first_difference(f16["tokens"], expect["tokens"])})
    out = os.environ.get("MLC_QUANT_GPU_RESULT")
    if out:
        Path(out).with_name(f"{Path(out).stem}-{variant}{Path(out).suffix}").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    assert len(expect["tokens"]) == GREEDY_TOKENS
    assert result["ppl_rel_diff"] <= PPL_REL_TOL, result  # vs the default (fp32) CPU build
    # Next-token choices at the 2047 scored positions of the perplexity text, against the CPU
    # build. Free-running equality of one 32-token path is reported, not asserted: the CPU build
    # itself leaves its path at the 3rd token when its input moves by one ulp (docs/performance.md).
    if cfg["dtype"] == "float32":
        # fp32: as close to the CPU build as the CPU build is to itself one ulp away (binomial
        # noise: 2.5 standard errors), and no flip of a choice the floor never flips near
        sd = np.sqrt(floor["agree"] * (1 - floor["agree"] / len(argmax))) + 1.0
        assert result["choices_agree"] >= floor["agree"] - 2.5 * sd, result
        assert result["choices_max_disagree_margin"] <= 2 * max(result["ulp_floor_max_disagree_margin"], TIE_MARGIN), result
    else:
        # fp16 activations: storage rounding at every op, far above one ulp of fp32; every choice
        # with a top-2 gap above 2 logits must still be the CPU's
        assert result["choices_max_disagree_margin"] <= 4 * TIE_MARGIN, result


# =============================================================================================
# make-gpu-bundle: the builds, and the CPU builds' expected outputs, for the GPU tests


def _needed_rows(*id_lists) -> np.ndarray:
    return np.unique(np.concatenate([np.asarray(x, np.int64).reshape(-1) for x in id_lists]))


def make_tiny(out: Path) -> None:
    """Tiny W8A8: CPU build (expected values) and two CUDA builds (fatbin / CUDA source)."""
    import tempfile  # pylint: disable=import-outside-toplevel

    from conftest import make_hf_model, save_hf_model  # pylint: disable=import-outside-toplevel
    from test_build import byte_tokenizer  # pylint: disable=import-outside-toplevel

    from mlc_quant.cli import main as cli  # pylint: disable=import-outside-toplevel
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    d = out / "tiny"
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_hf_model(make_hf_model("llama", tie_word_embeddings=False), os.path.join(tmp, "m"))
        byte_tokenizer(256).save_pretrained(model)
        common = ["--model", model, "--quantization", "smq_q8i8f16_2", "--max-seq-len", "128",
                  "--calib-samples", "3", "--calib-seq-len", "32", "--overwrite"]
        assert cli(["build", *common, "--output", str(d / "cpu")]) == 0
        assert cli(["build", *common, "--target", "cuda", "--output", str(d / "cuda")]) == 0
        assert cli(["build", *common, "--target", "cuda", "--dtype", "float32", "--output", str(d / "cuda32")]) == 0
        os.environ["MLC_QUANT_CUDA_SOURCE"] = "1"
        try:
            assert cli(["build", *common, "--target", "cuda", "--output", str(d / "cuda_src")]) == 0
        finally:
            del os.environ["MLC_QUANT_CUDA_SOURCE"]
        engine, _, _ = load_built(d / "cpu")
        prompt = [5, 17, 33, 101, 7, 250, 3]
        np.save(d / "cpu_logits.npy", engine.prefill(prompt))
        tokens = list(engine.generate(prompt, 12))
        (d / "expect.json").write_text(json.dumps({"prompt": prompt, "tokens": tokens}))
        np.save(d / "cpu_fp16_logits.npy", cpu_fp16_logits(model, prompt, common))
    shutil.rmtree(d / "cpu")


def cpu_fp16_logits(model: str, prompt, build_args) -> np.ndarray:
    """Logits of the same W8A8 plan built for the CPU in fp16 (what the CUDA build computes,
    up to kernel differences): calibration as scripts/build.py does it, then an fp16 llvm export."""
    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import BuildOptions, _calibrator  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.loader import load_config, load_params_dict  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    a = dict(zip(build_args[::2], build_args[1::2]))
    opts = BuildOptions(model=model, quantization=a["--quantization"], calib_samples=int(a["--calib-samples"]),
                        calib_seq_len=int(a["--calib-seq-len"]), max_seq_len=int(a["--max-seq-len"]))
    cfg = load_config(model)
    params = load_params_dict(model, cfg, "float32")
    mod, _ = export_model(cfg, "float32", "llvm")
    res = pipeline.quantize_module(mod, params, get_scheme(opts.quantization),
                                   _calibrator(opts, cfg, params, load_tokenizer(model)))
    mod16, _ = export_model(cfg, "float16", "llvm")
    qp = {k: v.astype(np.float16) if v.dtype == np.float32 and not k.endswith(".scale") else v
          for k, v in res.params.items()}
    engine = Engine(pipeline.build(res.plan.apply(mod16), "llvm"), qp, max_seq_len=64, vocab_size=cfg.vocab_size)
    return engine.prefill(prompt)


def make_smollm2(out: Path, cpu_build: Path, cuda_builds: Sequence[Path], ctx: int = 512, windows: int = 4,
                 prompt: str = "Once upon a time, in a small village by the sea, there lived",
                 cpu16_build: Path | None = None) -> None:
    """SmolLM2: the CPU build's greedy tokens and perplexity (expect.json), and the CUDA builds
    without their params (``cuda``: fp16, ``cuda32``: ``--dtype float32``). The params travel once,
    as ``rest.safetensors.xz`` (every param of the first build but the embedding table) +
    ``emb_rows.npz`` (the embedding rows the test's tokens gather; the others are zero on the GPU:
    the LM head is a separate int8 weight, so no output depends on them); a build of the other
    dtype gets them by the cast build.py applies (checked here to reproduce its own params
    exactly). The GPU machine takes at most 64 MiB a call, a build's params are 194-250 MB."""
    import lzma  # pylint: disable=import-outside-toplevel

    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel
    from mlc_quant.runner import load_built, read_text  # pylint: disable=import-outside-toplevel

    d = out / "smollm2"
    d.mkdir(parents=True, exist_ok=True)
    engine, tok, _ = load_built(cpu_build, max_seq_len=ctx)
    prompt_ids = tok.encode(prompt)
    tokens = greedy_tokens(engine, prompt_ids, GREEDY_TOKENS)
    _, margins = teacher_forced(engine, prompt_ids, tokens)
    ppl_ids = tok.encode(read_text("britannica"))[: ctx * windows]
    ppl, argmax, choice_margins = window_choices(engine, ppl_ids, ctx)
    # the floor: the CPU build against itself with its input moved by one ulp
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    cpu_params = dict(artifact.load_safetensors(Path(cpu_build) / artifact.PARAMS_FILE))
    nudged = Engine(str(Path(cpu_build) / artifact.LIB_FILE), ulp_nudged(cpu_params), max_seq_len=ctx,
                    vocab_size=len(cpu_params[EMBED]))
    del cpu_params
    ppl_n, argmax_n, _ = window_choices(nudged, ppl_ids, ctx)
    floor = {"ppl": ppl_n, "agree": sum(a == b for a, b in zip(argmax, argmax_n)),
             "disagree_margins": [m for a, b, m in zip(argmax, argmax_n, choice_margins) if a != b]}
    expect = {"prompt_text": prompt, "prompt": prompt_ids, "tokens": tokens, "text": tok.decode(tokens),
              "ppl": ppl, "ppl_ids": ppl_ids, "ctx": ctx, "windows": windows, "cpu_build": str(cpu_build),
              "margins": margins, "choices": {"argmax": argmax, "margins": choice_margins}, "ulp_floor": floor}
    print(f"[make-gpu-bundle] SmolLM2 CPU build: ppl {ppl:.4f}, tokens {tok.decode(tokens)!r}; one-ulp floor: "
          f"ppl {ppl_n:.4f}, {floor['agree']}/{len(argmax)} next-token choices equal", flush=True)
    if cpu16_build:  # the same build with --dtype float16: what the CUDA build computes
        engine16, _, cfg16 = load_built(cpu16_build, max_seq_len=ctx)
        assert cfg16["dtype"] == "float16", cfg16["dtype"]
        t16 = greedy_tokens(engine16, prompt_ids, GREEDY_TOKENS)
        expect["fp16"] = {"tokens": t16, "text": tok.decode(t16), "ppl": engine16.perplexity(ppl_ids, ctx),
                          "cpu_build": str(cpu16_build)}
        print(f"[make-gpu-bundle] SmolLM2 fp16 CPU build: ppl {expect['fp16']['ppl']:.4f}, "
              f"tokens {expect['fp16']['text']!r}", flush=True)
    base = None  # (dtype, params) of the build whose params travel
    variants = {}
    for build in cuda_builds:
        cfg = json.loads((Path(build) / artifact.CONFIG_FILE).read_text())
        variant = {"float16": "cuda", "float32": "cuda32"}[cfg["dtype"]]
        if variant in variants:
            raise ValueError(f"two CUDA builds of dtype {cfg['dtype']}: {variants[variant]} and {build}")
        variants[variant] = str(build)
        dst = d / variant
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(build, dst, ignore=shutil.ignore_patterns(artifact.PARAMS_FILE))
        params = dict(artifact.load_safetensors(Path(build) / artifact.PARAMS_FILE))
        if base is None:
            base = (cfg["dtype"], params)
            continue
        derived = cast_params(base[1], cfg["dtype"])
        if sorted(derived) != sorted(params) or any(
                derived[k].dtype != v.dtype or not np.array_equal(derived[k], v) for k, v in params.items()):
            raise ValueError(f"{build}'s params are not the cast of {cuda_builds[0]}'s: build both from the same "
                             "plan (same scheme, calibration and --merge-linears)")
    expect["params_from"] = base[0]
    (d / "expect.json").write_text(json.dumps(expect))
    params = dict(base[1])
    emb = params.pop(EMBED)
    rows = _needed_rows(prompt_ids, tokens, ppl_ids)
    np.savez(d / "emb_rows.npz", rows=rows, values=np.asarray(emb[rows]), shape=np.array(emb.shape))
    rest = d / "rest.safetensors.xz"
    if rest.is_file():
        rest.unlink()
    tmp = d / "rest.tmp.safetensors"
    artifact.save_safetensors(tmp, params)
    with open(tmp, "rb") as f, lzma.open(rest, "wb", preset=6) as g:
        shutil.copyfileobj(f, g, 1 << 24)
    tmp.unlink()




def cast_params(params: dict, dtype: str) -> dict:
    """What build.py does to an fp32 plan's params for an fp16 build (scales stay fp32)."""
    if dtype == "float32":
        return dict(params)
    return {k: v.astype(np.float16) if v.dtype == np.float32 and not k.endswith(".scale") else v
            for k, v in params.items()}


def assemble_smollm2_params(d: Path, variant: str = "cuda") -> Path:
    """On the GPU machine: params.safetensors of a CUDA build from rest.safetensors (already
    decompressed) and emb_rows.npz, cast to the build's dtype."""
    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel

    target = d / variant / artifact.PARAMS_FILE
    if target.is_file():
        return target
    cfg = json.loads((d / variant / artifact.CONFIG_FILE).read_text())
    params = dict(artifact.load_safetensors(d / "rest.safetensors"))
    e = np.load(d / "emb_rows.npz")
    emb = np.zeros(tuple(e["shape"]), e["values"].dtype)
    emb[e["rows"]] = e["values"]
    params[EMBED] = emb
    artifact.save_safetensors(target, cast_params(params, cfg["dtype"]))
    return target


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build what the GPU tests need (run on the CPU machine)")
    ap.add_argument("command", choices=["make-gpu-bundle"])
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--smollm2-cpu", help="SmolLM2 smq_q8i8f16_2 build for llvm (scripts/build.py)")
    ap.add_argument("--smollm2-cuda", action="append", default=[],
                    help="the same build for --target cuda (repeat for --dtype float16 and float32; "
                         "give the float32 one first: its params travel)")
    ap.add_argument("--smollm2-cpu16", help="optional: the same build for llvm with --dtype float16")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.tiny:
        make_tiny(Path(a.out))
    if a.smollm2_cpu:
        make_smollm2(Path(a.out), Path(a.smollm2_cpu), [Path(p) for p in a.smollm2_cuda], a.ctx, a.windows,
                     cpu16_build=Path(a.smollm2_cpu16) if a.smollm2_cpu16 else None)
