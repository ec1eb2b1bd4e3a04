"""Per-group SmoothQuant alpha: a grid search on calibration activations.

SmoothQuant (and its ports) use one migration strength ``alpha`` for every layer. Here each
smoothing group (the linears that read one activation, ``passes/smooth_linear.SmoothGroup``) gets
its own: for every alpha of a grid, the group is smoothed with
``s = max|X|^alpha / max|W|^(1-alpha)`` (the calibration statistics the build uses), its linears
are quantized with the scheme (activations per the scheme's IR, weights round-to-nearest), and the
alpha of lowest MSE wins. Two objectives:

* ``block`` (default where it applies): the **decoder block's output MSE**, block input from the
  float model on calibration sequences, the block run in torch (``autoround.TorchBlock``, which
  mirrors the Relax layer) with this group's linears quantized and the rest float:
  ``mean (block_q(h) - block(h))^2``. Groups outside the blocks (the LM head's) and rotated
  models (online Hadamard, which TorchBlock does not model) fall back to:
* ``group``: the output MSE of the group's own linears on a capped sample of calibration rows of
  their input X (``mlc_quant.capture``)::

      MSE(alpha) = sum over the group's linears of ||Q_a(X / s) deq(Q_w(W s))^T - X W^T||^2
                   / (rows * sum of their output widths)

Each group is searched on its own, the others float (down_proj's ``1/s`` folded into up_proj's
rows is not part of the gate/up group's objective). The global alpha is always in the grid, so
on the objective the search is never worse than it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mlc_quant.fakequant import output_error, quantized_weight
from mlc_quant.progress import progress
from mlc_quant.schemes import QuantScheme
from mlc_quant.smoothing import group_key, linear_weight_nk, smoothing_factors

log = logging.getLogger("mlc_quant")

DEFAULT_GRID: Tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_grid(spec) -> Tuple[float, ...]:
    """``"0.3,0.5,0.7"`` (or a sequence) -> sorted unique alphas, each in [0, 1]."""
    values = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec) if str(v).strip()]
    if not values:
        raise ValueError("the alpha grid is empty")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"alpha grid values must lie in [0, 1], got {bad}")
    return tuple(sorted(set(round(v, 6) for v in values)))


def group_mse(scheme: QuantScheme, linears: Sequence[str], x: np.ndarray, weights_nk: Mapping[str, np.ndarray],
              stats: Mapping[str, Mapping[str, np.ndarray]], alpha: float) -> float:
    """The group's output MSE under ``scheme`` after smoothing with ``alpha`` (see module doc)."""
    act_absmax = np.max(np.stack([stats[n]["absmax"] for n in linears]), axis=0)
    s = smoothing_factors(act_absmax, [weights_nk[n] for n in linears], alpha)
    inv = 1.0 / s
    err, count = 0.0, 0
    for n in linears:
        w = np.asarray(weights_nk[n], dtype=np.float32)
        act = scheme.act_qparams(stats[n], inv)
        w_s = (w.astype(np.float64) * s[None, :]).astype(np.float32)  # as smooth_params scales it
        e, _ = output_error(scheme, x, w, quantized_weight(scheme, n, w_s, act), inv, act)
        err += e
        count += x.shape[0] * w.shape[0]
    return err / max(count, 1)


def search_group(scheme: QuantScheme, linears: Sequence[str], x: np.ndarray, weights_nk: Mapping[str, np.ndarray],
                 stats: Mapping[str, Mapping[str, np.ndarray]], grid: Sequence[float]) -> Tuple[float, Dict[float, float]]:
    """(alpha of lowest MSE, {alpha: MSE}); ties go to the first alpha of the grid."""
    table = {float(a): group_mse(scheme, linears, x, weights_nk, stats, a) for a in grid}
    alphas = list(table)
    return alphas[int(np.argmin([table[a] for a in alphas]))], table


OBJECTIVES = ("block", "group")


class BlockObjective:
    """Block-output MSE of one decoder layer at a time (see the module doc).

    ``ids [samples, seq]``: calibration token ids; the float hidden states are advanced block by
    block (:meth:`advance`), so memory is two ``[samples, seq, hidden]`` arrays.
    """

    def __init__(self, config, params: Mapping[str, np.ndarray], ids: np.ndarray):
        from mlc_quant import autoround

        self.torch = autoround._torch()  # pylint: disable=protected-access
        self.config, self.params = config, params
        self.names_of = autoround.block_linear_names
        self.h = self.torch.from_numpy(np.asarray(params["model_embed_tokens_weight"], np.float32)[np.asarray(ids)])
        self.layer, self.block, self.ref = -1, None, None

    def set_layer(self, layer: int) -> None:
        """Move the float hidden states to the input of ``layer``; compute its float output."""
        from mlc_quant.autoround import TorchBlock

        while self.layer < layer:
            if self.ref is not None:
                self.h = self.ref
            self.layer += 1
            self.block = TorchBlock(self.config, self.params, self.layer)
            with self.torch.no_grad():
                self.ref = self.block.forward(self.h)

    def roles(self, layer: int, linears: Sequence[str]) -> Optional[List[str]]:
        by_name = {n: r for r, n in self.names_of(layer).items()}
        return [by_name[n] for n in linears] if all(n in by_name for n in linears) else None

    def mse(self, scheme: QuantScheme, roles: Sequence[str], linears: Sequence[str],
            weights_nk: Mapping[str, np.ndarray], stats, alpha: float) -> float:
        torch, block = self.torch, self.block
        act_absmax = np.max(np.stack([stats[n]["absmax"] for n in linears]), axis=0)
        s = smoothing_factors(act_absmax, [weights_nk[n] for n in linears], alpha)
        inv = 1.0 / s
        wq, acts = {}, {}
        for role, n in zip(roles, linears):
            act = scheme.act_qparams(stats[n], inv)
            w_s = (np.asarray(weights_nk[n], np.float64) * s[None, :]).astype(np.float32)
            wq[role] = torch.from_numpy(quantized_weight(scheme, n, w_s, act))
            if act is not None:
                acts[role] = act
        inv_t = torch.from_numpy(inv.astype(np.float32))
        block.inv_scale = {r: inv_t for r in roles}
        block.act_qparams, block.act, block.a_qmax = acts, scheme.act, scheme.a_qmax
        quant = set(roles)
        plain = type(block)._linear  # pylint: disable=protected-access

        def linear(x, role, w, quant_act, _self=block):
            return plain(_self, x, role, w, quant_act and role in quant)

        block._linear = linear  # pylint: disable=protected-access
        try:
            with torch.no_grad():
                out = block.forward(self.h, wq, quant_act=True)
        finally:
            del block._linear
            block.inv_scale, block.act_qparams, block.act = {}, {}, "none"
        return float(((out - self.ref).double() ** 2).mean())


def _layer_of(linears: Sequence[str]) -> Optional[int]:
    import re

    m = re.match(r"model_layers_(\d+)_", linears[0])
    return int(m.group(1)) if m else None


class AlphaSearch:
    """The pipeline's ``alpha`` callable (``pipeline.quantize_module``): per-group alphas.

    ``capture(mod, params) -> mlc_quant.capture.Captured`` supplies calibration rows of every
    linear input of the (annotated, float) module (the ``group`` objective). ``block_data() ->
    (config, ids [samples, seq])`` enables the ``block`` objective (None: ``group`` everywhere).
    After the call, ``report`` holds the grid, the objective and, per group, the chosen alpha's
    and the global alpha's MSE, for mlc-quant-config.json.
    """

    def __init__(self, capture: Callable, grid: Sequence[float] = DEFAULT_GRID, global_alpha: float = 0.5,
                 block_data: Optional[Callable] = None):
        self.capture = capture
        self.global_alpha = float(global_alpha)
        self.grid = parse_grid(list(grid) + [self.global_alpha])
        self.block_data = block_data
        self.report: Dict = {}

    def __call__(self, mod, groups, observer, params: Mapping[str, np.ndarray], layouts: Mapping[str, bool],
                 scheme: QuantScheme) -> Dict[str, float]:
        t0 = time.time()
        captured = None
        block = None
        if self.block_data is not None:
            config, ids = self.block_data()
            block = BlockObjective(config, params, ids)
        alphas: Dict[str, float] = {}
        per_group: Dict[str, Dict] = {}
        total, total_global = 0.0, 0.0
        todo = [g for g in groups if g.fold != "skip"]
        # block order: layer by layer (the float hidden states only move forward)
        todo.sort(key=lambda g: (_layer_of(g.linears) is None, _layer_of(g.linears) or 0))
        for g in progress(todo, desc="alpha search", unit="group"):
            key = group_key(g.linears)
            weights = {n: linear_weight_nk(np.asarray(params[n], dtype=np.float32), layouts[n]) for n in g.linears}
            stats = {n: observer.stats(n) for n in g.linears}
            layer = _layer_of(g.linears)
            roles = block.roles(layer, g.linears) if block is not None and layer is not None else None
            if roles is not None:
                block.set_layer(layer)
                table = {a: block.mse(scheme, roles, g.linears, weights, stats, a) for a in self.grid}
                objective = "block"
            else:
                if captured is None:
                    captured = self.capture(mod, params)
                if key not in captured.rows:
                    raise ValueError(f"alpha search: no captured activations for smoothing group {key!r}")
                _, table = search_group(scheme, g.linears, captured.rows[key], weights, stats, self.grid)
                objective = "group"
            best = list(table)[int(np.argmin(list(table.values())))]
            alphas[key] = best
            per_group[key] = {"alpha": best, "objective": objective, "mse": table[best],
                              "mse_global": table[self.global_alpha], "mse_grid": [table[a] for a in self.grid]}
            total += table[best]
            total_global += table[self.global_alpha]
        self.report = {
            "objective": ("decoder block output MSE with the group quantized (group output MSE for groups "
                          "outside the blocks)" if block is not None else
                          "output MSE of each smoothing group's linears under the scheme (calibration rows)"),
            "grid": list(self.grid), "global_alpha": self.global_alpha,
            "rows_per_group": int(max((v.shape[0] for v in captured.rows.values()), default=0)) if captured else 0,
            "block_tokens": list(block.h.shape[:2]) if block is not None else None,
            "mse_sum": total, "mse_sum_global": total_global, "seconds": round(time.time() - t0, 1),
            "groups": per_group,
        }
        log.info("alpha search: %d groups, summed group MSE %.4g (global alpha %.2f: %.4g) in %.0f s",
                 len(alphas), total, self.global_alpha, total_global, time.time() - t0)
        return alphas


def load_group_alphas(path) -> Dict[str, float]:
    """Per-group alphas from an mlc-quant-config.json (``quantization.group_alphas``) or a JSON
    object ``{group_key: alpha}`` (or ``{"group_alphas": {...}}``)."""
    import json
    import pathlib

    p = pathlib.Path(path)
    if p.is_dir():
        from mlc_quant.artifact import CONFIG_FILE

        p = p / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"alpha file {str(path)!r} not found: give a number in [0, 1], 'search', "
                                "or an mlc-quant-config.json with per-group alphas")
    data = json.loads(p.read_text())
    found = data.get("quantization", {}).get("group_alphas") if isinstance(data, dict) else None
    found = found if found is not None else (data.get("group_alphas", data) if isinstance(data, dict) else None)
    if not isinstance(found, dict) or not found or not all(isinstance(v, (int, float)) for v in found.values()):
        raise ValueError(f"{p} holds no per-group alphas (expected quantization.group_alphas, built with --alpha search)")
    return {str(k): float(v) for k, v in found.items()}


def resolve_alpha(spec, capture: Optional[Callable] = None, grid: Sequence[float] = DEFAULT_GRID,
                  global_alpha: float = 0.5, block_data: Optional[Callable] = None):
    """``--alpha``: a float, ``search`` (an :class:`AlphaSearch`), or a config/JSON path of per-group alphas."""
    if isinstance(spec, (int, float)):
        return float(spec)
    text = str(spec).strip()
    try:
        return float(text)
    except ValueError:
        pass
    if text == "search":
        if capture is None:
            raise ValueError("--alpha search needs calibration activations (a capture function)")
        return AlphaSearch(capture, grid, global_alpha, block_data)
    return load_group_alphas(text)


__all__ = ["AlphaSearch", "BlockObjective", "OBJECTIVES", "DEFAULT_GRID", "group_mse", "load_group_alphas", "parse_grid", "resolve_alpha",
           "search_group"]
