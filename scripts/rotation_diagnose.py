#!/usr/bin/env python3
"""Where does W8A8's perplexity gap on a rotated SmolLM2 come from? A torch mirror, fake-quant.

    python scripts/rotation_diagnose.py --rotation r1r2r4 --first-window 16 --windows 8 \
        --out docs/rotation_diagnose.json

The whole model runs in torch (``mlc_quant.autoround.TorchBlock``'s decoder math, the R4 online
Hadamard on the down_proj input as the deployed kernel computes it, the final norm and the head)
on the rotated params of ``mlc_quant.rotation.rotate_params``. Each experiment fake-quantizes a
chosen subset: int8 per-channel symmetric weights (``--weight-clip`` picks absmax or the
MSE-optimal clip of ``mlc_quant.schemes.clip_weight_scales``) and/or int8 per-token activations,
for chosen linear roles (q, k, v, o, gate, up, down, head) and layers. Perplexity is scored as
``Engine.perplexity`` scores it (non-overlapping windows, each from a fresh cache) on windows
[first, first + count) of the Britannica article; the default 16..23 are held out from the
16-window table of docs/accuracy.md. Not smoothed (the diagnosis is about the quantizers).
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlc_quant import hadamard, rotation  # noqa: E402
from mlc_quant.autoround import block_linear_names, rope_cos_sin  # noqa: E402
from mlc_quant.datasets import britannica_text  # noqa: E402
from mlc_quant.model.loader import load_config, load_params_dict, resolve_model  # noqa: E402
from mlc_quant.model.tokenizer import load_tokenizer  # noqa: E402
from mlc_quant.schemes import get_scheme  # noqa: E402

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "head")


def torch_fwht(x: torch.Tensor) -> torch.Tensor:
    """x H_n^T / sqrt(n) along the last axis, as ``hadamard.fwht`` (float32)."""
    n = x.shape[-1]
    hm, p = hadamard.hadamard_factors(n)
    hm = torch.from_numpy(hm.astype(np.float32))
    lead = x.shape[:-1]
    y = torch.einsum("ac,...cb->...ab", hm, x.reshape(*lead, n // p, p))
    h = 1
    while h < p:
        y = y.reshape(*lead, n // p, p // (2 * h), 2, h)
        y = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2)
        h *= 2
    return y.reshape(*lead, n) / math.sqrt(n)


class Mirror:
    """The rotated float model in torch; ``run(ids, wq, aq)`` with per-(layer, role) fake-quant."""

    def __init__(self, config, params, r4: bool):
        self.cfg, self.r4 = config, r4
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        self.embed = t(params[rotation.EMBED])
        head = rotation.HEAD if rotation.HEAD in params else rotation.EMBED
        self.w = {(None, "head"): t(params[head])}
        self.norms = {}
        self.bias = {}
        for i in range(config.num_hidden_layers):
            for role, name in block_linear_names(i).items():
                self.w[(i, role)] = t(params[name])
                b = name[: -len("weight")] + "bias"
                if b in params:
                    self.bias[(i, role)] = t(params[b])
            self.norms[i] = (t(params[f"model_layers_{i}_input_layernorm_weight"]),
                             t(params[f"model_layers_{i}_post_attention_layernorm_weight"]))
        self.final_norm = t(params[rotation.FINAL_NORM])

    def norm(self, x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps) * g

    def lin(self, x, key, wq, aq):
        if key in aq:
            s = torch.clamp(x.abs().amax(-1, keepdim=True) / 127.0, min=1e-8)
            x = torch.clamp(torch.round(x / s), -127, 127) * s
        y = torch.nn.functional.linear(x, wq.get(key, self.w[key]))
        return y + self.bias[key] if key in self.bias else y

    @torch.no_grad()
    def run(self, ids: torch.Tensor, wq, aq) -> torch.Tensor:
        cfg = self.cfg
        b, s = ids.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos, sin = rope_cos_sin(cfg, s)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]

        def rope(t):
            return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

        x = self.embed[ids]
        for i in range(cfg.num_hidden_layers):
            h = self.norm(x, self.norms[i][0])
            q = rope(self.lin(h, (i, "q"), wq, aq).reshape(b, s, nh, hd)).transpose(1, 2)
            k = rope(self.lin(h, (i, "k"), wq, aq).reshape(b, s, nkv, hd)).transpose(1, 2)
            v = self.lin(h, (i, "v"), wq, aq).reshape(b, s, nkv, hd).transpose(1, 2)
            if nkv != nh:
                k, v = (t.repeat_interleave(nh // nkv, 1) for t in (k, v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5)
            x = x + self.lin(a.transpose(1, 2).reshape(b, s, nh * hd), (i, "o"), wq, aq)
            h = self.norm(x, self.norms[i][1])
            m = torch.nn.functional.silu(self.lin(h, (i, "gate"), wq, aq)) * self.lin(h, (i, "up"), wq, aq)
            if self.r4:
                m = torch_fwht(m)
            x = x + self.lin(m, (i, "down"), wq, aq)
        return self.lin(self.norm(x, self.final_norm), (None, "head"), wq, aq)


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    return float(-lp.gather(-1, ids[:, 1:, None]).sum())


def parse_set(spec: str, layers: int):
    """'all', 'none', 'q,k,v', 'down@0-9', 'mlp', 'attn' -> set of (layer, role) keys."""
    if spec in ("", "none"):
        return set()
    out = set()
    for part in spec.split("+"):
        roles, _, lay = part.partition("@")
        roles = {"all": ROLES, "attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
                 "blocks": ROLES[:-1]}.get(roles, tuple(roles.split(",")))
        lo, hi = (0, layers - 1) if not lay else (int(lay.split("-")[0]), int(lay.split("-")[-1]))
        for r in roles:
            if r not in ROLES:
                raise ValueError(f"unknown role {r!r}; valid: {ROLES}")
            if r == "head":
                out.add((None, "head"))
            else:
                out.update((i, r) for i in range(lo, hi + 1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rotation", default="r1r2r4")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--first-window", type=int, default=16)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--weight-clip", default="absmax", help="absmax or mse (schemes.clip_weight_scales)")
    p.add_argument("--exp", action="append", default=[],
                   help="NAME=W_SET/A_SET, e.g. w_only=all/none, a_only=none/all, down=down/down")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    path = resolve_model(args.model)
    config = load_config(path)
    params = load_params_dict(path, config, "float32")
    rot = rotation.Rotation(args.rotation)
    params = rotation.rotate_params(params, config, rot)
    model = Mirror(config, params, rot.has("r4"))
    scheme = get_scheme("smq_q8i8f16_3")
    ids = load_tokenizer(path).encode(britannica_text())
    ids = ids[args.first_window * args.ctx:(args.first_window + args.windows) * args.ctx]
    ids = torch.tensor(np.asarray(ids, dtype=np.int64).reshape(args.windows, args.ctx))

    qcache = {}

    def wq_of(keys):
        out = {}
        for key in keys:
            if key not in qcache:
                w = model.w[key].numpy()
                qp = scheme.quantize_weight("w", w, None, clip=args.weight_clip) if args.weight_clip != "absmax" \
                    else scheme.quantize_weight("w", w, None)
                qcache[key] = torch.from_numpy(qp["w.q"].astype(np.float32) * qp["w.scale"][:, None])
            out[key] = qcache[key]
        return out

    def ppl(wset, aset):
        per_window = [nll_sum(model.run(ids[j:j + 1], wq_of(wset), aset), ids[j:j + 1])  # bounded memory
                      for j in range(ids.shape[0])]
        return math.exp(sum(per_window) / (ids.shape[0] * (args.ctx - 1))), per_window

    results = {"setup": {"command": "python " + " ".join(sys.argv), "rotation": args.rotation,
                         "windows": [args.first_window, args.first_window + args.windows], "ctx": args.ctx}, "runs": {}}
    if args.out and os.path.exists(args.out):  # same windows and rotation: keep finished runs
        old = json.load(open(args.out))
        if all(old["setup"].get(k) == results["setup"][k] for k in ("rotation", "windows", "ctx")):
            results["runs"] = {k: v for k, v in old["runs"].items() if "window_nll" in v}
    t0 = time.time()
    if "float" not in results["runs"]:
        base, base_w = ppl(set(), set())
        results["runs"]["float"] = {"perplexity": base, "window_nll": base_w}
    base, base_w = results["runs"]["float"]["perplexity"], results["runs"]["float"]["window_nll"]
    print(f"float {base:.4f} ({time.time() - t0:.0f} s)", flush=True)
    for e in args.exp:
        name, _, spec = e.partition("=")
        ws, _, as_ = spec.partition("/")
        if name in results["runs"] and results["runs"][name].get("w") == ws and results["runs"][name].get("a") == as_ \
                and results["runs"][name].get("weight_clip") == args.weight_clip:
            print(f"{name}: kept from {args.out}: {results['runs'][name]['perplexity']:.4f}", flush=True)
            continue
        t0 = time.time()
        v, v_w = ppl(parse_set(ws, config.num_hidden_layers), parse_set(as_, config.num_hidden_layers))
        results["runs"][name] = {"w": ws, "a": as_, "perplexity": v, "vs_float_pct": (v / base - 1) * 100,
                                 "weight_clip": args.weight_clip, "window_nll": v_w}
        print("  mean NLL change per window:", " ".join(f"{(a - b) / (args.ctx - 1):+.4f}"
                                                        for a, b in zip(v_w, base_w)), flush=True)
        print(f"{name:20s} W={ws:14s} A={as_:14s} {v:.4f} {(v / base - 1) * 100:+.3f}% ({time.time() - t0:.0f} s)",
              flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
