"""AutoRound (Cheng et al., EMNLP Findings 2024; intel/auto-round): learned rounding, block by block.

For every decoder block, and every linear weight ``W`` in it, AutoRound learns

* a rounding offset ``V`` (same shape as ``W``, in [-0.5, 0.5]): ``q = round(W / s + V)``;
* per-group clipping factors ``min_scale`` / ``max_scale`` in [0, 1] that shrink the group's min
  and max before the scale and zero point are computed,

with SignSGD (``p -= lr * sign(grad)``, straight-through rounding) on the MSE between the block's
float output and its quantized output, keeping the parameters of the best loss seen.

Defaults follow the reference (preset ``paper``): 200 iterations, lr = 1 / iters decaying
linearly to 0, min/max lr = lr, 128 samples of 2048 tokens, batch 8 random samples per
iteration, the *quantized* outputs of block i are the inputs of block i + 1 (while the targets
come from the float chain), best-loss parameters restored. Preset ``fast`` is the CPU one.

What is computed where:

* :class:`TorchBlock` mirrors ``mlc_quant.model.llama.LlamaDecoderLayer`` as deployed in Relax:
  ``R.nn.rms_norm``, RoPE exactly as TVM's paged KV cache computes it (``NORMAL`` mode, float32
  ``pos / theta ** (2 i / d)``, llama3 scaling), causal GQA attention with ``head_dim ** -0.5``,
  q/k/v biases, SwiGLU, explicit smoothing multiplies and (for the W8A8 schemes) the activation
  quantization of each linear. python/tests/test_autoround.py checks its float forward against
  the compiled Relax block.
* Block inputs are captured once: block 0's are the embedding rows of the calibration tokens;
  every later block's come from running the previous block (float chain for the targets,
  quantized chain for the inputs). Only the current block's activations exist at any time
  (at most three ``[nsamples, seqlen, hidden]`` float32 stores); above ``memory_budget_mb``
  they live in ``np.memmap`` files under the work directory instead of RAM, and on a GPU with
  room for them (a quarter of its free memory) in GPU memory.
* Every tuned block is written to ``<work_dir>/<fingerprint>/block_NNN.npz`` (atomically) with
  its integer weights, scales and zero points; an interrupted run started again with the same
  model, data and settings reuses them (it only re-runs the cheap forward passes of the
  finished blocks to rebuild the activation chains), so no tuning work is lost. With every block
  checkpointed (e.g. tuned on a GPU by ``scripts/autoround_gpu.py``) nothing runs at all.
* Importing this module needs numpy and torch, not TVM (``mlc_quant.groupquant`` holds the numpy
  quantizer), so the tuning runs on a machine with only TVM's runtime.
* The result is handed to the pipeline as a ``WeightQuantizer`` (:func:`make_autoround_quantizer`)
  that returns each linear's params in the scheme's own naming (``<w>.q`` / ``.scale`` / ...).
  Linears outside the decoder blocks (the LM head) are rounded to nearest, as the reference
  leaves the head alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

# numpy / torch only at import (no TVM): the tuning runs where only TVM's runtime is installed
# (scripts/autoround_gpu.py on the GPU machine); the scheme classes are imported where used.
from mlc_quant.groupquant import _EPS, INT8_MAX, group_layout, quantize_groups_np
from mlc_quant.progress import progress

if TYPE_CHECKING:
    from mlc_quant.schemes import QuantScheme

log = logging.getLogger("mlc_quant")

# (role, IR name suffix) of the seven linears of a decoder block, in execution order.
BLOCK_LINEARS = (
    ("q", "self_attn_q_proj"), ("k", "self_attn_k_proj"), ("v", "self_attn_v_proj"),
    ("o", "self_attn_o_proj"), ("gate", "mlp_gate_proj"), ("up", "mlp_up_proj"), ("down", "mlp_down_proj"),
)


def block_linear_names(layer: int) -> Dict[str, str]:
    """role -> IR weight name (``model_layers_{i}_self_attn_q_proj_weight``, ...)."""
    return {role: f"model_layers_{layer}_{suffix}_weight" for role, suffix in BLOCK_LINEARS}


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AutoRoundPreset:
    """AutoRound's knobs. ``lr=None`` means 1 / iters (the reference default), ``minmax_lr=None``
    means lr."""

    name: str = "custom"
    iters: int = 200
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    lr: Optional[float] = None
    minmax_lr: Optional[float] = None
    enable_minmax: bool = True
    quantized_input: bool = True  # block i+1 is tuned on quantized block i's outputs
    memory_budget_mb: float = 4096.0  # activations of the current block above this go to disk
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return 1.0 / self.iters if self.lr is None else float(self.lr)

    @property
    def minmax_learning_rate(self) -> float:
        return self.learning_rate if self.minmax_lr is None else float(self.minmax_lr)


PRESETS: Dict[str, AutoRoundPreset] = {
    # the reference defaults (GPU)
    "paper": AutoRoundPreset("paper", iters=200, nsamples=128, seqlen=2048, batch_size=8),
    # CPU (docs/accuracy.md): 4x fewer samples, 8x shorter, a quarter of the steps (auto-round's
    # "light" recipe also stops at 50 iterations); lr stays 1 / iters
    "fast": AutoRoundPreset("fast", iters=50, nsamples=32, seqlen=256, batch_size=8),
}


def get_preset(preset="fast", **overrides) -> AutoRoundPreset:
    """A preset by name (``fast`` / ``paper``) or as given, with field overrides."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown AutoRound preset {preset!r}; valid: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if not isinstance(preset, AutoRoundPreset):
        raise TypeError(f"preset must be a name or an AutoRoundPreset, got {type(preset).__name__}")
    preset = dataclasses.replace(preset, **overrides) if overrides else preset
    if preset.iters < 0 or preset.nsamples < 1 or preset.seqlen < 2 or preset.batch_size < 1:
        raise ValueError(f"bad AutoRound settings: {preset}")
    return preset


@dataclass(frozen=True)
class WeightFormat:
    """The integer grid AutoRound rounds onto: ``q`` in [qmin, qmax], groups of ``group_size``
    input channels (<= 0: one group per output channel), symmetric or with a zero point."""

    qmin: int
    qmax: int
    sym: bool
    group_size: int

    def quantize_np(self, w: np.ndarray, **learned):
        return quantize_groups_np(w, self.qmin, self.qmax, self.group_size, sym=self.sym, **learned)


def weight_format(scheme: QuantScheme) -> WeightFormat:
    """The weight grid of a scheme AutoRound can serve (W4 weight-only, W8 per-channel)."""
    from mlc_quant.schemes_w4 import WeightOnlyScheme  # pylint: disable=import-outside-toplevel

    if isinstance(scheme, WeightOnlyScheme):
        return WeightFormat(0, scheme.qmax, False, scheme.group_size)
    if scheme.weight == "per_channel_sym":
        qmax = getattr(scheme, "w_qmax", INT8_MAX)
        return WeightFormat(-qmax, qmax, True, -1)
    if scheme.weight == "per_channel_asym":
        return WeightFormat(-128, 127, False, -1)
    raise ValueError(f"AutoRound cannot round the weights of scheme {scheme.name} ({scheme.weight}); it serves "
                     "q4f16_* and the per-channel W8 schemes smq_q8i8f16_1/_2/_3")


def pack_weight(scheme: QuantScheme, name: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                act=None) -> Dict[str, np.ndarray]:
    """The params of weight ``name`` in ``scheme``'s naming, from AutoRound's integers (``q [N, K]``,
    per-channel ``scale`` / ``zp [N, 1]`` for the W8 schemes), exactly as the scheme's own
    ``quantize_weight`` lays them out (static activation scales folded into ``.scale``)."""
    from mlc_quant.schemes_w4 import WeightOnlyScheme  # pylint: disable=import-outside-toplevel

    if isinstance(scheme, WeightOnlyScheme):
        return scheme.pack(name, q, scale, zp)
    sx = act.scale if act is not None else 1.0
    if scheme.weight == "per_channel_sym":
        return {f"{name}.q": q.astype(np.int8), f"{name}.scale": (scale[:, 0] * sx).astype(np.float32)}
    assert scheme.weight == "per_channel_asym", scheme.weight
    zw = zp[:, 0].astype(np.int64)
    zx = act.zero_point if act is not None else 0
    corr = zx * q.astype(np.int64).sum(axis=1) - q.shape[1] * zx * zw
    return {f"{name}.q": q.astype(np.int8), f"{name}.scale": (scale[:, 0].astype(np.float64) * sx).astype(np.float32),
            f"{name}.zp": zw.astype(np.int32), f"{name}.corr": corr.astype(np.int32)}


# --------------------------------------------------------------------------- torch pieces
def _torch():
    if "torch" not in sys.modules:
        # OpenMP threads that spin while waiting are 5-10x slower on a shared, busy CPU.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # heavy: only when AutoRound runs

    return torch


def round_ste(x):
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


def pad_groups_torch(w, group_size: int):
    """``w [N, K]`` -> zero-padded ``[N, G, g]`` (as :func:`mlc_quant.schemes_w4.pad_groups`)."""
    torch = _torch()
    n, k = w.shape
    g, groups, p = group_layout(k, group_size)
    if p != k:
        w = torch.cat([w, w.new_zeros(n, p - k)], dim=1)
    return w.reshape(n, groups, g)


def group_minmax(wg):
    """Per-group ``(min(w, 0), max(w, 0))`` of ``wg [N, G, g]`` (constant while tuning)."""
    torch = _torch()
    return torch.clamp(wg.amin(dim=-1), max=0.0), torch.clamp(wg.amax(dim=-1), min=0.0)


def _qdq_function():
    """``s * clamp(round(w / s + v), qmin - zp, qmax - zp)`` as one autograd node.

    The same values and gradients as the reference's straight-through form
    ``(clamp(round_ste(w / s + v) + zp, qmin, qmax) - zp) * s``, in a third of the full-size
    tensor operations (the elementwise work on every weight dominated a CPU iteration).
    """
    torch = _torch()

    class QDQ(torch.autograd.Function):  # pylint: disable=abstract-method
        @staticmethod
        def forward(ctx, wg, v, s, zp, qmin, qmax):  # pylint: disable=arguments-differ
            x = wg / s
            if v is not None:
                x = x + v
            r = torch.round(x)
            lo, hi = qmin - zp, qmax - zp
            q = torch.clamp(r, lo, hi)
            ctx.save_for_backward(wg, s, r, lo, hi, q)
            ctx.v_none = v is None
            return q * s

        @staticmethod
        def backward(ctx, grad):  # pylint: disable=arguments-differ
            wg, s, r, lo, hi, q = ctx.saved_tensors
            inside = (r >= lo) & (r <= hi)
            g_in = grad * inside
            g_v = None if ctx.v_none else g_in * s
            g_s = (grad * q).sum(dim=-1, keepdim=True) - (g_in * wg).sum(dim=-1, keepdim=True) / s
            g_zp = -(grad.sum(dim=-1, keepdim=True) - g_in.sum(dim=-1, keepdim=True)) * s
            return None, g_v, g_s, g_zp, None, None

    return QDQ


_QDQ = None


def qdq_torch(wg, fmt: WeightFormat, v=None, min_scale=None, max_scale=None, minmax=None):
    """Fake-quantized ``wg [N, G, g]`` (float32), differentiable in ``v`` / ``min_scale`` / ``max_scale``
    with straight-through rounding; bit-exact with :func:`quantize_groups_np` + dequantize.
    ``minmax``: the precomputed :func:`group_minmax` of ``wg``."""
    global _QDQ  # pylint: disable=global-statement
    torch = _torch()
    if _QDQ is None:
        _QDQ = _qdq_function()
    lo, hi = group_minmax(wg) if minmax is None else minmax
    if min_scale is not None:
        lo = lo * min_scale
    if max_scale is not None:
        hi = hi * max_scale
    if fmt.sym:
        s = torch.clamp(torch.maximum(lo.abs(), hi), min=_EPS) / float(fmt.qmax)
        zp = torch.zeros_like(s)
    else:
        s64 = torch.clamp(hi.double() - lo.double(), min=_EPS) / float(fmt.qmax - fmt.qmin)
        s = s64.float()
        zp = torch.clamp(round_ste(fmt.qmin - lo.double() / s64), fmt.qmin, fmt.qmax).float()
    return _QDQ.apply(wg, v, s[..., None], zp[..., None], float(fmt.qmin), float(fmt.qmax))


class SignSGD:
    """``p <- p - lr * sign(grad)`` per parameter group (AutoRound's optimizer, no momentum), with
    the reference's linear decay of every group's lr from its initial value to 0 over
    ``total_steps`` steps."""

    def __init__(self, groups: List[Tuple[list, float]], total_steps: int):
        self.groups = [(list(params), float(lr)) for params, lr in groups]
        self.total = max(int(total_steps), 1)
        self.step_count = 0

    def lr_factor(self) -> float:
        return max(0.0, 1.0 - self.step_count / self.total)

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    def step(self) -> None:
        torch = _torch()
        f = self.lr_factor()
        with torch.no_grad():
            for params, lr in self.groups:
                for p in params:
                    if p.grad is not None:
                        p.add_(torch.sign(p.grad), alpha=-lr * f)
        self.step_count += 1


def rope_cos_sin(config, n: int, device=None):
    """cos / sin ``[n, head_dim]`` of positions 0..n-1, computed as TVM's KV cache does (float32)."""
    torch = _torch()
    hd = config.head_dim
    d = torch.arange(hd, device=device)
    exponent = ((d * 2) % hd).to(torch.float32) / torch.tensor(float(hd), dtype=torch.float32, device=device)
    theta = torch.tensor(float(config.rope_theta), dtype=torch.float32, device=device)
    power = torch.pow(theta, exponent)
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    rs = config.rope_scaling
    if rs and rs.get("rope_type") == "llama3":
        orig = 1.0 / power
        inv_diff = 1.0 / (rs["high_freq_factor"] - rs["low_freq_factor"])
        alpha = rs["original_max_position_embeddings"] / (2 * math.pi) * inv_diff
        beta = rs["low_freq_factor"] * inv_diff
        smooth = torch.clamp(alpha * orig - beta, 0.0, 1.0)
        freq = pos * ((1.0 - smooth) * orig * (1.0 / rs["factor"]) + smooth * orig)
    else:
        freq = pos / power
    return torch.cos(freq), torch.sin(freq)


class TorchBlock:
    """One decoder layer of ``mlc_quant.model.llama`` in torch, on (possibly smoothed) params.

    ``forward(x, weights)`` takes ``x [B, S, hidden]`` (each sample a fresh sequence from
    position 0) and per-role weights ``[N, K]`` (float or fake-quantized); ``quant_act`` applies
    the scheme's activation quantization in front of every linear (what the deployed W8A8 block
    does). The float params are held, not copied per call.
    """

    def __init__(self, config, params: Mapping[str, np.ndarray], layer: int, device=None,
                 inv_scales: Optional[Mapping[str, np.ndarray]] = None, act: str = "none",
                 act_qparams: Optional[Mapping] = None, a_qmax: int = INT8_MAX):
        torch = _torch()
        self.config, self.layer = config, layer
        self.device = torch.device(device or "cpu")
        self.names = block_linear_names(layer)
        prefix = f"model_layers_{layer}_"

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

        self.weights = {role: t(params[name]) for role, name in self.names.items()}
        self.bias = {}
        for role in ("q", "k", "v"):
            bname = self.names[role][: -len("weight")] + "bias"
            if bname in params:
                self.bias[role] = t(params[bname])
        self.norm_in = t(params[prefix + "input_layernorm_weight"])
        self.norm_post = t(params[prefix + "post_attention_layernorm_weight"])
        inv_scales = inv_scales or {}
        self.inv_scale = {role: t(inv_scales[n]) for role, n in self.names.items() if n in inv_scales}
        self.act, self.a_qmax = act, int(a_qmax)
        self.act_qparams = {role: act_qparams[n] for role, n in self.names.items()
                            if act_qparams and act_qparams.get(n) is not None}
        self._rope: Dict[int, tuple] = {}

    def _norm(self, x, w):
        torch = _torch()
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.config.rms_norm_eps) * w

    def _linear(self, x, role: str, w, quant_act: bool):
        torch = _torch()
        if role in self.inv_scale:
            x = x * self.inv_scale[role]
        if quant_act and self.act == "per_token_sym":
            s = torch.clamp(x.abs().amax(dim=-1, keepdim=True) / float(self.a_qmax), min=_EPS)
            x = torch.clamp(round_ste(x / s), -self.a_qmax, self.a_qmax) * s
        elif quant_act and role in self.act_qparams:  # static per-tensor (zero point for _2)
            a = self.act_qparams[role]
            xq = torch.clamp(round_ste(x / a.scale) + a.zero_point, -128, 127)
            x = (xq - a.zero_point) * a.scale
        y = torch.nn.functional.linear(x, w)
        return y + self.bias[role] if role in self.bias else y

    def rope(self, n: int):
        if n not in self._rope:
            self._rope[n] = rope_cos_sin(self.config, n, self.device)
        return self._rope[n]

    def forward(self, x, weights: Optional[Mapping] = None, quant_act: bool = False):
        torch = _torch()
        cfg = self.config
        w = self.weights if weights is None else {**self.weights, **weights}
        b, s, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = self._norm(x, self.norm_in)
        q = self._linear(h, "q", w["q"], quant_act).reshape(b, s, nh, hd)
        k = self._linear(h, "k", w["k"], quant_act).reshape(b, s, nkv, hd)
        v = self._linear(h, "v", w["v"], quant_act).reshape(b, s, nkv, hd)
        cos, sin = self.rope(s)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]

        def rot(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        q, k = rot(q).transpose(1, 2), rot(k).transpose(1, 2)
        v = v.transpose(1, 2)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5)
        a = a.transpose(1, 2).reshape(b, s, nh * hd)
        x = x + self._linear(a, "o", w["o"], quant_act)
        h = self._norm(x, self.norm_post)
        m = torch.nn.functional.silu(self._linear(h, "gate", w["gate"], quant_act)) * \
            self._linear(h, "up", w["up"], quant_act)
        return x + self._linear(m, "down", w["down"], quant_act)

    __call__ = forward


# --------------------------------------------------------------------------- activations
class ActStore:
    """``[nsamples, seqlen, hidden]`` float32 block activations: in RAM, or a ``np.memmap`` file
    when ``path`` is given (the spill above the memory budget), or a torch tensor on ``device``
    (a GPU with room for them: no host copy of the batch every iteration)."""

    def __init__(self, shape: Tuple[int, ...], path: Optional[pathlib.Path] = None, device=None):
        self.shape, self.path = tuple(shape), path
        self.array = self.tensor = None
        if device is not None:
            if path is not None:
                raise ValueError("ActStore: a device store is never spilled to disk")
            self.tensor = _torch().empty(self.shape, dtype=_torch().float32, device=device)
        elif path is None:
            self.array = np.empty(self.shape, np.float32)
        else:
            self.array = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=self.shape)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def read(self, index, device=None):
        torch = _torch()
        if self.tensor is not None:
            if not isinstance(index, slice):
                index = torch.as_tensor(np.asarray(index), device=self.tensor.device)
            return self.tensor[index].to(device or "cpu")
        return torch.from_numpy(np.ascontiguousarray(self.array[index])).to(device or "cpu")

    def write(self, start: int, values) -> None:
        if self.tensor is not None:
            values = values if hasattr(values, "detach") else _torch().from_numpy(np.ascontiguousarray(values))
            self.tensor[start:start + values.shape[0]] = values.detach().to(self.tensor.device)
            return
        self.array[start:start + values.shape[0]] = values.detach().cpu().numpy() if hasattr(values, "detach") \
            else values

    def close(self) -> None:
        self.array = self.tensor = None
        if self.path is not None and self.path.exists():
            self.path.unlink()


# --------------------------------------------------------------------------- checkpoints
def default_work_dir() -> pathlib.Path:
    """``$MLC_QUANT_AUTOROUND_DIR``, else ``~/.cache/mlc_quant/autoround``."""
    env = os.environ.get("MLC_QUANT_AUTOROUND_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "mlc_quant" / "autoround"


def _fingerprint(config, params, ids: np.ndarray, fmt: WeightFormat, preset: AutoRoundPreset, act: str,
                 inv_scales, act_qparams, a_qmax: int) -> str:
    """Everything the result depends on: model config and block weights (after smoothing),
    tokens, format, settings (not the memory budget), activation quantization."""
    h = hashlib.sha1()
    settings = dataclasses.asdict(preset)
    settings.pop("memory_budget_mb")
    settings.pop("name")
    h.update(json.dumps({"config": config.to_dict(), "fmt": dataclasses.asdict(fmt), "preset": settings,
                         "act": act, "a_qmax": a_qmax, "version": 1}, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(ids).tobytes())
    keys = ["model_embed_tokens_weight"] + sorted(k for k in params if k.startswith("model_layers_"))
    for k in keys:
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    for name in sorted(inv_scales or {}):
        h.update(name.encode() + np.ascontiguousarray(inv_scales[name]).tobytes())
    for name in sorted(act_qparams or {}):
        a = act_qparams[name]
        if a is not None:
            h.update(f"{name}:{a.scale!r}:{a.zero_point}".encode())
    return h.hexdigest()[:16]


def _save_block(path: pathlib.Path, result: Dict[str, tuple], meta: dict) -> None:
    arrays = {}
    for name, (q, scale, zp) in result.items():
        arrays[f"{name}/q"] = q.astype(np.int8 if q.min() < 0 else np.uint8)
        arrays[f"{name}/scale"], arrays[f"{name}/zp"] = scale, zp.astype(np.int16)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: a block file is either complete or absent


def _load_block(path: pathlib.Path, names: Iterable[str]) -> Optional[Tuple[Dict[str, tuple], dict]]:
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            result = {n: (z[f"{n}/q"].astype(np.int32), z[f"{n}/scale"].astype(np.float32),
                          z[f"{n}/zp"].astype(np.int32)) for n in names}
        return result, meta
    except (OSError, KeyError, ValueError) as err:
        log.warning("AutoRound: ignoring unreadable checkpoint %s (%s)", path, err)
        return None


def _load_all_blocks(ckdir: pathlib.Path, n_layers: int) -> Optional[List[Tuple[Dict[str, tuple], dict]]]:
    """Every block's checkpoint in ``ckdir``, or None when any is missing or unreadable."""
    paths = [ckdir / f"block_{layer:03d}.npz" for layer in range(n_layers)]
    if not all(p.exists() for p in paths):
        return None
    out = []
    for layer, path in enumerate(paths):
        loaded = _load_block(path, block_linear_names(layer).values())
        if loaded is None:
            return None
        out.append(loaded)
    return out


# --------------------------------------------------------------------------- the algorithm
def _dequant_torch(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int, device):
    torch = _torch()
    n, groups = scale.shape
    qg = torch.from_numpy(q.reshape(n, groups, -1).astype(np.float32))
    w = (qg - torch.from_numpy(zp.astype(np.float32))[..., None]) * torch.from_numpy(scale)[..., None]
    return w.reshape(n, -1)[:, :k].contiguous().to(device)


def tune_block(block: TorchBlock, inputs: ActStore, targets: ActStore, fmt: WeightFormat,
               preset: AutoRoundPreset, seed: int = 0, bar=None) -> Tuple[Dict[str, tuple], dict]:
    """AutoRound one block: SignSGD on MSE(block_q(inputs), targets), best-loss parameters.

    Returns ``({weight name: (q [N, P] int32, scale [N, G], zp [N, G])}, stats)``.
    """
    torch = _torch()
    dev = block.device
    wg = {role: pad_groups_torch(block.weights[role], fmt.group_size) for role in block.names}
    minmax = {role: group_minmax(w) for role, w in wg.items()}
    vs = {role: torch.zeros_like(w, requires_grad=True) for role, w in wg.items()}
    mins = {role: torch.ones(w.shape[:2], device=dev, requires_grad=True) for role, w in wg.items()}
    maxs = {role: torch.ones(w.shape[:2], device=dev, requires_grad=True) for role, w in wg.items()}
    groups = [(list(vs.values()), preset.learning_rate)]
    if preset.enable_minmax:
        groups.append((list(mins.values()) + list(maxs.values()), preset.minmax_learning_rate))
    opt = SignSGD(groups, preset.iters)
    ks = {role: block.weights[role].shape[1] for role in block.names}

    def fake_weights():
        out = {}
        for role, w in wg.items():
            mn, mx = (mins[role], maxs[role]) if preset.enable_minmax else (None, None)
            out[role] = qdq_torch(w, fmt, vs[role], mn, mx, minmax[role]).reshape(w.shape[0], -1)[:, : ks[role]]
        return out

    def snapshot():
        return {role: (vs[role].detach().clone(), mins[role].detach().clone(), maxs[role].detach().clone())
                for role in wg}

    gen = torch.Generator().manual_seed(int(seed))
    ns = inputs.shape[0]
    bs = min(preset.batch_size, ns)
    best, best_loss, best_iter, first_loss = snapshot(), math.inf, -1, None
    t0 = time.time()
    for it in range(preset.iters):
        idx = np.sort(torch.randperm(ns, generator=gen)[:bs].numpy())
        x, y = inputs.read(idx, dev), targets.read(idx, dev)
        out = block.forward(x, fake_weights(), quant_act=True)
        loss = torch.nn.functional.mse_loss(out, y)
        value = float(loss.item())
        if first_loss is None:
            first_loss = value  # round-to-nearest (v = 0, scales 1) on the first batch
        if value < best_loss:
            best, best_loss, best_iter = snapshot(), value, it
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for role in wg:
                vs[role].clamp_(-0.5, 0.5)
                mins[role].clamp_(0.0, 1.0)
                maxs[role].clamp_(0.0, 1.0)
        if bar is not None:
            bar.update(1)
            if it % 10 == 0 or it == preset.iters - 1:
                bar.set_postfix(loss=f"{value:.3g}", best=f"{best_loss:.3g}", refresh=False)
    result = {}
    for role, name in block.names.items():
        v, mn, mx = best[role]
        learned = {"v": v.cpu().numpy()}
        if preset.enable_minmax:
            learned.update(min_scale=mn.cpu().numpy(), max_scale=mx.cpu().numpy())
        w = block.weights[role].cpu().numpy()
        result[name] = fmt.quantize_np(w, **learned)
    stats = {"first_batch_loss_rtn": first_loss, "best_batch_loss": best_loss if best_iter >= 0 else None,
             "best_iter": best_iter, "tune_s": round(time.time() - t0, 2)}
    return result, stats


def _forward_store(block: TorchBlock, src: ActStore, dst: ActStore, batch: int, weights=None,
                   quant_act: bool = False, target: Optional[ActStore] = None) -> Optional[float]:
    """dst = block(src) in chunks; with ``target`` also the MSE of the output against it."""
    torch = _torch()
    sq, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, src.shape[0], batch):
            sl = slice(i, min(i + batch, src.shape[0]))
            out = block.forward(src.read(sl, block.device), weights, quant_act=quant_act)
            if dst is not None:
                dst.write(i, out)
            if target is not None:
                sq += float(((out - target.read(sl, block.device)) ** 2).sum())
                count += out.numel()
    return sq / count if target is not None else None


def run_autoround(config, params: Mapping[str, np.ndarray], samples: Iterable, fmt: WeightFormat,
                  preset: AutoRoundPreset | str = "fast", work_dir=None, *, act: str = "none",
                  inv_scales: Optional[Mapping[str, np.ndarray]] = None, act_qparams: Optional[Mapping] = None,
                  a_qmax: int = INT8_MAX, device=None, keep_checkpoints: bool = True,
                  report: Optional[dict] = None) -> Dict[str, tuple]:
    """AutoRound every decoder block of a Llama-family model.

    ``params``: IR-named float params (after smoothing); ``samples``: token-id arrays of at least
    ``preset.seqlen`` tokens (the first ``preset.nsamples`` are used). Returns
    ``{linear weight name: (q [N, P] int32, scale [N, G] float32, zp [N, G] int32)}`` for the
    linears of every block. ``report`` (a dict) receives per-block losses and times.
    """
    torch = _torch()
    preset = get_preset(preset)
    ids = []
    for s in samples:
        s = np.asarray(s).reshape(-1)
        if s.size >= preset.seqlen:
            ids.append(s[: preset.seqlen].astype(np.int64))
        if len(ids) == preset.nsamples:
            break
    if not ids:
        raise ValueError(f"AutoRound needs calibration samples of at least {preset.seqlen} tokens; got none")
    if len(ids) < preset.nsamples:
        log.warning("AutoRound: only %d of %d samples of %d tokens available", len(ids), preset.nsamples,
                    preset.seqlen)
    ids = np.stack(ids)
    ns, sl, hidden, n_layers = ids.shape[0], ids.shape[1], config.hidden_size, config.num_hidden_layers
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    root = pathlib.Path(work_dir) if work_dir is not None else default_work_dir()
    key = _fingerprint(config, params, ids, fmt, preset, act, inv_scales, act_qparams, a_qmax)
    ckdir = root / key
    ckdir.mkdir(parents=True, exist_ok=True)
    for stale in ckdir.glob("acts_*.npy"):  # activation spills of an interrupted run
        stale.unlink()
    finished = _load_all_blocks(ckdir, n_layers)
    if finished is not None:  # every block checkpointed (e.g. tuned on a GPU): no forward passes at all
        log.info("AutoRound: all %d blocks checkpointed in %s; using them as they are", n_layers, ckdir)
        results, blocks_report = {}, []
        for layer, (qres, stats) in enumerate(finished):
            results.update(qres)
            blocks_report.append({"block": layer, **stats, "resumed": True})
        if report is not None:
            report.update({"preset": preset.name, "iters": preset.iters, "nsamples": int(ns), "seqlen": int(sl),
                           "batch_size": preset.batch_size, "lr": preset.learning_rate, "device": None,
                           "spilled": False, "total_s": 0.0, "fingerprint": key, "blocks": blocks_report})
        if not keep_checkpoints:
            shutil.rmtree(ckdir, ignore_errors=True)
        return results
    store_bytes = ns * sl * hidden * 4
    spill = 3 * store_bytes > preset.memory_budget_mb * 2**20
    # on a GPU with room for the three stores (a quarter of its free memory at most): keep them there
    on_gpu = dev.type == "cuda" and not spill and 3 * store_bytes < 0.25 * torch.cuda.mem_get_info(dev)[0]
    stores: List[ActStore] = []

    def new_store():
        path = ckdir / f"acts_{os.getpid()}_{len(stores)}.npy" if spill else None
        stores.append(ActStore((ns, sl, hidden), path, dev if on_gpu else None))
        return stores[-1]

    log.info("AutoRound (%s: %d iters, %d x %d tokens, batch %d, lr %.4g) on %s; activations %s (%.0f MB each); "
             "checkpoints in %s", preset.name, preset.iters, ns, sl, preset.batch_size, preset.learning_rate, dev,
             "spilled to disk" if spill else ("in GPU memory" if on_gpu else "in memory"), store_bytes / 2**20, ckdir)
    emb = params["model_embed_tokens_weight"]
    fin = new_store()
    for i in range(0, ns, preset.batch_size):
        fin.write(i, emb[ids[i:i + preset.batch_size]].astype(np.float32))
    qin = fin
    results: Dict[str, tuple] = {}
    blocks_report = []
    t_start, tuned_s, tuned_n = time.time(), 0.0, 0
    outer = progress(total=n_layers, desc="AutoRound", unit="block", position=0)
    try:
        for layer in range(n_layers):
            t0 = time.time()
            block = TorchBlock(config, params, layer, dev, inv_scales, act, act_qparams, a_qmax)
            names = list(block.names.values())
            fout = new_store()
            _forward_store(block, fin, fout, preset.batch_size)
            if fin is not qin:
                fin.close()
            ck = ckdir / f"block_{layer:03d}.npz"
            loaded = _load_block(ck, names) if ck.exists() else None
            if loaded is not None:
                qres, stats = loaded
                stats = {**stats, "resumed": True}
            else:
                bar = progress(total=preset.iters, desc=f"block {layer + 1}/{n_layers}", unit="it",
                               position=1, leave=False)
                try:
                    qres, stats = tune_block(block, qin, fout, fmt, preset, seed=preset.seed * 100003 + layer, bar=bar)
                finally:
                    bar.close()
            # the block's quantized weights; MSE of RTN and AutoRound over every sample
            ks = {role: block.weights[role].shape[1] for role in block.names}
            wq = {role: _dequant_torch(*qres[block.names[role]], ks[role], dev) for role in block.names}
            if "mse_rtn" not in stats:
                w_rtn = {role: _dequant_torch(*fmt.quantize_np(block.weights[role].cpu().numpy()), ks[role], dev)
                         for role in block.names}
                stats["mse_rtn"] = _forward_store(block, qin, None, preset.batch_size, w_rtn, True, fout)
            qout = new_store() if preset.quantized_input else None
            mse = _forward_store(block, qin, qout, preset.batch_size, wq, True, fout)
            stats.setdefault("mse_autoround", mse)
            if loaded is None:
                _save_block(ck, qres, stats)
                tuned_s += time.time() - t0
                tuned_n += 1
            qin.close()
            fin, qin = fout, (qout if qout is not None else fout)
            results.update(qres)
            blocks_report.append({"block": layer, **stats, "block_s": round(time.time() - t0, 2)})
            left = n_layers - layer - 1
            eta = tuned_s / tuned_n * left if tuned_n else 0.0
            log.info("AutoRound block %d/%d: MSE RTN %.4g -> AutoRound %.4g (%.1f%%)%s, %.1f s, ETA %s",
                     layer + 1, n_layers, stats["mse_rtn"], stats["mse_autoround"],
                     100.0 * (stats["mse_autoround"] / max(stats["mse_rtn"], 1e-30) - 1.0),
                     " [resumed]" if loaded is not None else f" [best iter {stats.get('best_iter')}]",
                     time.time() - t0, time.strftime("%H:%M:%S", time.gmtime(eta)))
            outer.update(1)
    finally:
        outer.close()
        for st in stores:  # also those of a block interrupted half-way
            st.close()
    if report is not None:
        report.update({"preset": preset.name, "iters": preset.iters, "nsamples": int(ns), "seqlen": int(sl),
                       "batch_size": preset.batch_size, "lr": preset.learning_rate, "device": str(dev),
                       "spilled": spill, "total_s": round(time.time() - t_start, 1), "fingerprint": key,
                       "blocks": blocks_report})
    if not keep_checkpoints:
        shutil.rmtree(ckdir, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- pipeline hook
def make_autoround_quantizer(config, samples: Iterable, preset: AutoRoundPreset | str = "fast", work_dir=None,
                             *, device=None, keep_checkpoints: bool = False) -> Callable:
    """A ``pipeline.WeightQuantizer`` that AutoRounds the decoder blocks' linears.

    ``samples``: calibration token-id arrays (``preset.nsamples`` of ``preset.seqlen`` tokens);
    ``work_dir``: where per-block checkpoints go (default :func:`default_work_dir`), kept after a
    successful run only with ``keep_checkpoints``. The returned callable has a ``report`` dict
    (per-block MSE of RTN and AutoRound, times) once it ran.
    """
    from mlc_quant.smoothing import linear_weight_nk

    preset = get_preset(preset)
    samples = list(samples)
    report: dict = {}

    def autoround_weights(params: Dict[str, np.ndarray], sites: Dict, plan) -> Dict[str, np.ndarray]:
        scheme = plan.scheme
        fmt = weight_format(scheme)
        for layer in range(config.num_hidden_layers):
            for name in block_linear_names(layer).values():
                if name not in sites or not sites[name].transposed:
                    raise ValueError(f"AutoRound: {name} is not an nn.Linear-layout linear of the module")
        res = run_autoround(config, params, samples, fmt, preset, work_dir, act=scheme.act,
                            inv_scales=plan.explicit_inv_scales, act_qparams=plan.act_qparams,
                            a_qmax=getattr(scheme, "a_qmax", INT8_MAX), device=device,
                            keep_checkpoints=keep_checkpoints, report=report)
        out: Dict[str, np.ndarray] = {}
        for name, site in sites.items():
            act = plan.act_qparams.get(name)
            if name in res:
                out.update(pack_weight(scheme, name, *res[name], act))
            else:  # outside the blocks (LM head): round to nearest
                out.update(scheme.quantize_weight(name, linear_weight_nk(params[name], site.transposed), act))
        return out

    autoround_weights.report = report
    return autoround_weights


# --------------------------------------------------------------------------- build wiring
ROUNDINGS = ("rtn", "autoround")


def build_rounding(scheme: QuantScheme, weight_rounding: str = "rtn", preset: str = "fast",
                   rotation_mode: str = "none") -> str:
    """The weight rounding a build uses (``q4f16_autoround`` implies AutoRound); errors early, before
    any heavy work, for settings AutoRound cannot serve."""
    if weight_rounding not in ROUNDINGS:
        raise ValueError(f"unknown --weight-rounding {weight_rounding!r}; valid: {', '.join(ROUNDINGS)}")
    rounding = "autoround" if getattr(scheme, "rounding", "rtn") == "autoround" else weight_rounding
    if rounding == "autoround":
        get_preset(preset)
        weight_format(scheme)
        if rotation_mode not in ("none", "r1r2"):
            raise ValueError(f"--weight-rounding autoround supports --rotation none or r1r2 (weights only), not "
                             f"{rotation_mode!r}: its torch block does not apply the online R3/R4 Hadamards")
    return rounding


def build_quantizer(config, tokenizer, dataset: str, preset: str = "fast", seed: int = 0) -> Callable:
    """The AutoRound ``WeightQuantizer`` of an LLM build: ``preset.nsamples`` sequences of
    ``preset.seqlen`` tokens of ``dataset`` (``mlc_quant.datasets.calibration_samples``)."""
    from mlc_quant.datasets import calibration_samples

    preset = get_preset(preset)
    if preset.seqlen > config.max_position_embeddings:
        preset = dataclasses.replace(preset, seqlen=config.max_position_embeddings)
    if dataset == "dummy":
        log.warning("AutoRound on --dataset dummy (random token ids): use real text, e.g. --dataset shakespeare")
    samples = calibration_samples(dataset, tokenizer, config.vocab_size, preset.nsamples, preset.seqlen, seed=seed)
    return make_autoround_quantizer(config, samples, preset,
                                    keep_checkpoints=bool(os.environ.get("MLC_QUANT_AUTOROUND_KEEP")))
