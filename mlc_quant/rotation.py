"""SpinQuant / QuaRot rotations of a Llama-family model: params transforms + the IR passes.

Rotations make activations and weights easier to quantize (no outlier channels) while the
float model computes the same function. Row-vector convention: a residual-stream activation x
becomes ``x Q`` for an orthogonal Q.

* norm fusion: every RMSNorm weight g is folded into the columns of the linears it feeds
  (``W -> W diag(g)``) and set to ones (the IR op stays; RMSNorm with a ones weight is the
  weightless norm). Needed by R1: ``rmsnorm(x Q) = rmsnorm(x) Q`` only without g.
* R1 (hidden size, fused): embedding rows ``E -> E Q1``; residual writers (o_proj, down_proj)
  ``W -> Q1^T W``; residual readers (q/k/v, gate/up, the head) ``W -> W Q1``. A tied head is
  untied first (``passes/untie_head.py``): the head now differs from the table.
* R2 (head_dim, fused, per layer): v_proj rows of every KV head ``W_h -> Q2^T W_h`` (and its
  bias ``b_h -> b_h Q2``), o_proj columns of every attention head ``W_h -> W_h Q2``. Shared by
  the query heads of a GQA group, since every head gets the same Q2.
* R4 (intermediate size, online): ``passes/rotate_online.py`` rotates the down_proj input by
  ``H / sqrt(K)`` with a fast Walsh-Hadamard kernel; here down_proj's weight gets the same
  transform on its rows (``W -> W H^T / sqrt(K)``).
* R3 (head_dim, online): q and k after RoPE (``passes/rotate_online.py``); no weight change.

Embedding centering (QuaRot's LayerNorm -> RMSNorm conversion) is *not* applied: it is exact
only in front of LayerNorm, which subtracts the mean anyway; our models use RMSNorm, for which
``rmsnorm(x - mean(x)) != rmsnorm(x)`` (QuaRot skips it for Llama too). ``center_embedding``
is provided for LayerNorm models and refuses RMSNorm ones.

Matrices: ``hadamard`` = QuaRot's randomized Hadamard ``diag(+-1) H / sqrt(n)`` (seeded), for
sizes ``mlc_quant.hadamard`` can build; ``random-orthogonal`` = seeded Haar-random, any size.
The online R3/R4 transforms are always (non-random) Hadamard: that is what the fast kernel
computes. All weight arithmetic is float64, stored back in the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np
from tvm import IRModule

from mlc_quant import hadamard

MODES: Dict[str, Tuple[str, ...]] = {
    "none": (),
    "r1r2": ("r1", "r2"),
    "r1r2r4": ("r1", "r2", "r4"),
    "all": ("r1", "r2", "r3", "r4"),
}
EMBED, HEAD, FINAL_NORM = "model_embed_tokens_weight", "lm_head_weight", "model_norm_weight"


@dataclass(frozen=True)
class Rotation:
    """Which rotations to apply (``mode``), with which fused matrices (``kind``), seeded."""

    mode: str = "none"
    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown rotation {self.mode!r}; valid: {', '.join(MODES)}")
        if self.kind not in hadamard.ROTATION_KINDS:
            raise ValueError(f"unknown rotation kind {self.kind!r}; valid: {', '.join(hadamard.ROTATION_KINDS)}")

    def has(self, r: str) -> bool:
        return r in MODES[self.mode]

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def _layer(i: int, name: str) -> str:
    return f"model_layers_{i}_{name}"


def _head_name(config) -> str:
    return EMBED if config.tie_word_embeddings else HEAD


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _matmul_rows(w: np.ndarray, q: np.ndarray, block: int = 8192) -> np.ndarray:
    """w @ q in float64, in row blocks (the 49152-row embedding stays small), w's dtype kept."""
    out = np.empty(w.shape[:-1] + (q.shape[1],), dtype=w.dtype)
    for i in range(0, w.shape[0], block):
        out[i:i + block] = (_f64(w[i:i + block]) @ q).astype(w.dtype)
    return out


# ----------------------------------------------------------------------------- checks

def check_supported(config, rot: Rotation) -> None:
    """A clear ValueError when a size has no matrix of the requested kind (before any work)."""
    needs = []
    if rot.kind == "hadamard":
        if rot.has("r1"):
            needs.append(("R1 (hidden_size)", config.hidden_size))
        if rot.has("r2"):
            needs.append(("R2 (head_dim)", config.head_dim))
    if rot.has("r4"):
        needs.append(("R4 (intermediate_size, online Hadamard)", config.intermediate_size))
    if rot.has("r3"):
        needs.append(("R3 (head_dim, online Hadamard)", config.head_dim))
    for what, n in needs:
        try:
            hadamard.base_order_of(n)
        except ValueError as err:
            hint = "" if "online" not in what else " (online rotations must be Hadamard: use --rotation r1r2)"
            raise ValueError(f"rotation {rot.mode}: {what} = {n}: {err}{hint}") from None


# ----------------------------------------------------------------------------- params transforms

def center_embedding(params: Mapping[str, np.ndarray], norm: str = "rms_norm") -> Dict[str, np.ndarray]:
    """Subtract each embedding row's mean (QuaRot, for LayerNorm models only).

    Exact only when every reader of the residual stream is a LayerNorm (which removes the mean
    itself) and every residual writer is centered too; RMSNorm is not invariant, so it raises.
    """
    if norm != "layer_norm":
        raise ValueError("embedding centering is exact only for LayerNorm models; RMSNorm models (Llama, "
                         "Qwen2, Mistral) are rotated without it, as in QuaRot")
    out = dict(params)
    e = _f64(params[EMBED])
    out[EMBED] = (e - e.mean(axis=1, keepdims=True)).astype(params[EMBED].dtype)
    return out


def untie_params(params: Mapping[str, np.ndarray], config) -> Dict[str, np.ndarray]:
    """A tied model's params plus ``lm_head_weight`` (a copy of the table), matching UntieHead."""
    out = dict(params)
    if config.tie_word_embeddings:
        out[HEAD] = np.array(params[EMBED], copy=True)
    return out


def fuse_norms(params: Mapping[str, np.ndarray], config) -> Dict[str, np.ndarray]:
    """Fold every RMSNorm weight into the columns of the linears it feeds; the norms become ones.

    Needs an untied head (``untie_params``) when the model ties it to the embedding.
    """
    if config.tie_word_embeddings and HEAD not in params:
        raise ValueError("fuse_norms: untie the head first (untie_params), the table must not change")
    out = dict(params)

    def fold(norm: str, readers: List[str]) -> None:
        g = _f64(out[norm])
        for r in readers:
            out[r] = (_f64(out[r]) * g[None, :]).astype(out[r].dtype)
        out[norm] = np.ones_like(out[norm])

    for i in range(config.num_hidden_layers):
        fold(_layer(i, "input_layernorm_weight"), [_layer(i, f"self_attn_{p}_proj_weight") for p in "qkv"])
        fold(_layer(i, "post_attention_layernorm_weight"), [_layer(i, f"mlp_{p}_proj_weight") for p in ("gate", "up")])
    fold(FINAL_NORM, [HEAD])
    return out


def rotate_r1(params: Mapping[str, np.ndarray], config, q1: np.ndarray) -> Dict[str, np.ndarray]:
    """R1 on fused-norm, untied params: the residual stream becomes x Q1."""
    out = dict(params)
    readers = [HEAD]
    writers = []
    for i in range(config.num_hidden_layers):
        readers += [_layer(i, f"self_attn_{p}_proj_weight") for p in "qkv"]
        readers += [_layer(i, f"mlp_{p}_proj_weight") for p in ("gate", "up")]
        writers += [_layer(i, "self_attn_o_proj_weight"), _layer(i, "mlp_down_proj_weight")]
    for name in [EMBED] + readers:  # rows are residual vectors: x -> x Q1
        out[name] = _matmul_rows(out[name], q1)
    for name in writers:  # output side: W -> Q1^T W
        out[name] = (q1.T @ _f64(out[name])).astype(out[name].dtype)
    return out


def rotate_r2(params: Mapping[str, np.ndarray], config, q2_of_layer) -> Dict[str, np.ndarray]:
    """R2: v_proj output and o_proj input rotated per head by Q2 (head_dim), GQA-aware."""
    out = dict(params)
    d, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        q2 = q2_of_layer(i)
        v, o = _layer(i, "self_attn_v_proj_weight"), _layer(i, "self_attn_o_proj_weight")
        wv = _f64(out[v]).reshape(nkv, d, -1)
        out[v] = np.einsum("ed,hek->hdk", q2, wv).reshape(nkv * d, -1).astype(out[v].dtype)  # Q2^T W_h
        vb = _layer(i, "self_attn_v_proj_bias")
        if vb in out:
            out[vb] = (_f64(out[vb]).reshape(nkv, d) @ q2).reshape(-1).astype(out[vb].dtype)
        wo = _f64(out[o]).reshape(-1, nh, d)
        out[o] = (wo @ q2).reshape(-1, nh * d).astype(out[o].dtype)  # W_h Q2
    return out


def rotate_r4(params: Mapping[str, np.ndarray], config) -> Dict[str, np.ndarray]:
    """R4's weight side: down_proj rows through the same normalized Hadamard as the kernel."""
    out = dict(params)
    for i in range(config.num_hidden_layers):
        name = _layer(i, "mlp_down_proj_weight")
        out[name] = hadamard.fwht(out[name]).astype(out[name].dtype)
    return out


def rotate_params(params: Mapping[str, np.ndarray], config, rot: Rotation) -> Dict[str, np.ndarray]:
    """The params transform of ``rot`` (goes with ``rotation_ir`` on the module)."""
    check_supported(config, rot)
    out = dict(params)
    if rot.has("r1"):
        out = fuse_norms(untie_params(out, config), config)
        out = rotate_r1(out, config, hadamard.rotation_matrix(config.hidden_size, rot.kind, rot.seed))
    if rot.has("r2"):
        out = rotate_r2(out, config,
                        lambda i: hadamard.rotation_matrix(config.head_dim, rot.kind, rot.seed + 1 + i))
    if rot.has("r4"):
        out = rotate_r4(out, config)
    return out


# ----------------------------------------------------------------------------- IR

def rotation_ir(mod: IRModule, config, rot: Rotation, target="llvm") -> IRModule:
    """The IR side of ``rot`` on an exported model (any dtype/target): untie a tied head for R1,
    online Hadamard kernels for R4 (down_proj input) and R3 (q/k after RoPE)."""
    from mlc_quant.passes.rotate_online import RotateOnline  # pylint: disable=import-outside-toplevel
    from mlc_quant.passes.untie_head import UntieHead  # pylint: disable=import-outside-toplevel

    check_supported(config, rot)
    if rot.has("r1") and config.tie_word_embeddings:
        mod = UntieHead(EMBED, HEAD)(mod)
    if rot.has("r4") or rot.has("r3"):
        downs = [_layer(i, "mlp_down_proj_weight") for i in range(config.num_hidden_layers)] if rot.has("r4") else []
        mod = RotateOnline(downs, qk=rot.has("r3"), target=target)(mod)
    return mod


def rotate_model(mod: IRModule, params: Mapping[str, np.ndarray], config, rot: Rotation, target="llvm"
                 ) -> Tuple[IRModule, Dict[str, np.ndarray], Dict]:
    """Rotate an exported float model: (module, params, summary). ``rot.mode == 'none'``: unchanged."""
    if not rot.enabled:
        return mod, dict(params), {"mode": "none"}
    new_mod = rotation_ir(mod, config, rot, target)
    new_params = rotate_params(params, config, rot)
    summary = {"mode": rot.mode, "kind": rot.kind, "seed": rot.seed, "rotations": list(MODES[rot.mode]),
               "untied_head": bool(rot.has("r1") and config.tie_word_embeddings)}
    if rot.has("r4") or rot.has("r3"):
        summary["online"] = {k: f"{hadamard.base_order_of(n)} x {n // hadamard.base_order_of(n)}"
                             for k, n, r in (("r4", config.intermediate_size, "r4"), ("r3", config.head_dim, "r3"))
                             if rot.has(r)}
    return new_mod, new_params, summary
