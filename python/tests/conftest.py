"""Shared test fixtures: tiny random Llama-family checkpoints and a fast CPU build.

`build_cpu` is TVM's default llvm pipeline plus a register-tiled matmul schedule: the
default pipeline leaves matmuls as naive loop nests (~0.7 GFLOP/s on this machine, 0.36 s
per SmolLM2 token of prefill); tiled and vectorized they run ~20x faster, which is what
keeps the real-model tests within a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tvm
from tvm import s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

# ----------------------------------------------------------------------------- CPU build


class CPUMatmul(CPUScheduleRule):
    """C[..., i, j] = sum_k A[..., i, k] * B[..., k, j], plus an injective epilogue.

    Legalized `matmul(x, permute_dims(w))` materializes w^T [K, N], so j is contiguous in
    both B and C: a TI x VJ register tile (TI rows of A broadcast against VJ columns of B)
    accumulates over k, vectorized along j, with tiles in parallel.
    """

    def __init__(self, ti: int = 4, vj: int = 32):
        self.ti, self.vj = ti, vj

    def apply(self, func, target, _tunable):  # pylint: disable=too-many-locals
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not infos[0].is_reduction():
            return None
        main, epilogues = infos[0], infos[1:]
        kinds = "".join(it.kind for it in main.iters)
        if not kinds.endswith("SSR") or kinds.count("R") != 1:
            return None
        if not all(b.is_injective() for b in epilogues):
            return None
        *batch, i, j, k = sch.get_loops(main.block_rv)
        ext_j, ext_i = sch.get(j).extent, sch.get(i).extent
        if not isinstance(ext_j, tirx.IntImm):
            return None
        ti = 1 if isinstance(ext_i, tirx.IntImm) and int(ext_i) == 1 else self.ti
        # GEMV (decode): wide column tiles, so each row of B is read in long contiguous runs.
        widths = (256, 128, 64, self.vj, 16, 8, 4) if ti == 1 else (self.vj, 16, 8, 4)
        vj = next((v for v in widths if int(ext_j) % v == 0), None)
        if vj is None:
            return None
        io, ii = sch.split(i, [None, ti])
        jo, ji = sch.split(j, [None, vj])
        sch.reorder(*batch, io, jo, k, ii, ji)
        acc = sch.cache_write(main.block_rv, 0, "local")
        sch.reverse_compute_at(acc, jo)
        # Epilogues run per tile, right after its write-back. (Not reverse_compute_inline:
        # it mis-rewrites consumers that read the output twice, like silu = x * sigmoid(x).)
        for epi in epilogues:
            sch.reverse_compute_at(epi.block_rv, jo)
        sch.parallel(sch.fuse(*batch, io, jo))
        sch.vectorize(ji)
        sch.unroll(ii)
        for block in [acc] + [e.block_rv for e in epilogues]:
            sch.vectorize(sch.get_loops(block)[-1])
        sch.decompose_reduction(main.block_rv, k)
        return sch


class CPUTranspose(CPUScheduleRule):
    """2-D weight transposes (legalized permute_dims of every linear weight, run per call):
    16x16 tiles so reads and writes both stay in cache, tiles in parallel. Naive, they
    took 2/3 of a SmolLM2 decode step."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or len(infos) != 1 or not infos[0].is_injective():
            return None
        loops = sch.get_loops(infos[0].block_rv)
        block = sch.get(infos[0].block_rv)
        if len(loops) != 2 or len(block.reads) != 1 or "transpose" not in block.name_hint:
            return None
        extents = [sch.get(lp).extent for lp in loops]
        if not all(isinstance(e, tirx.IntImm) and int(e) % 16 == 0 for e in extents):
            return None
        i, j = loops
        io, ii = sch.split(i, [None, 16])
        jo, ji = sch.split(j, [None, 16])
        sch.reorder(io, jo, ii, ji)
        sch.parallel(sch.fuse(io, jo))
        sch.vectorize(ji)
        return sch


SCHEDULE_RULES = (CPUMatmul(), CPUTranspose(), dl.cpu.GEMV(), dl.cpu.Reduction())


def cpu_pipeline(target: tvm.target.Target):
    """TVM's llvm default pipeline with dlight CPU schedules after legalization."""

    @tvm.transform.module_pass(opt_level=0, name="MlcQuantTestCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(*SCHEDULE_RULES)]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def build_cpu(mod: tvm.IRModule, target: str = "llvm") -> tvm.runtime.Executable:
    target = tvm.target.Target(target)
    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))


# ----------------------------------------------------------------------------- tiny models

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "rope_theta": 1000.0,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.2,  # larger than default: distinct logits, no greedy near-ties
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def make_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random transformers model (float32, eval mode) of the tiny config."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    kwargs = {**TINY, **overrides}
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kwargs)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**kwargs)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms/biases start at 1/0: randomize so loading them is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def save_hf_model(model, folder: str, **save_kwargs) -> str:
    model.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """HF folder (config.json + model.safetensors) of a tiny GQA Llama, untied head."""
    folder = str(tmp_path_factory.mktemp("tiny_llama"))
    return save_hf_model(make_hf_model("llama", tie_word_embeddings=False), folder)


@pytest.fixture(scope="session")
def tiny_config_dict(tiny_llama_dir):
    with open(os.path.join(tiny_llama_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
