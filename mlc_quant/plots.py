"""The observatory's figures (matplotlib, Agg backend: no display needed). One function per PNG."""
from __future__ import annotations

import re
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def short_name(linear: str) -> str:
    """``model_layers_3_mlp_down_proj_weight`` -> ``L3 down_proj``."""
    m = re.match(r"model_layers_(\d+)_(?:self_attn|mlp)_(.+?)(?:_weight)?$", linear)
    if m:
        return f"L{m.group(1)} {m.group(2)}"
    return linear.replace("_weight", "")


def group_label(key: str) -> str:
    """A smoothing group's key (comma-joined linears) as ``L3 gate_proj+up_proj``."""
    names = [short_name(n) for n in key.split(",")]
    layer = {n.split(" ")[0] for n in names if n.startswith("L")}
    if len(layer) == 1 and all(" " in n for n in names):
        return f"{layer.pop()} " + "+".join(n.split(" ", 1)[1] for n in names)
    return "+".join(names)


def _ratio(v: np.ndarray) -> float:
    med = float(np.median(v))
    return float(np.max(v)) / med if med > 0 else float("inf")


def activation_outliers(path, layers: Sequence[Tuple[str, Mapping[str, np.ndarray]]]) -> None:
    """Per-channel activation abs-max of chosen linear inputs, one row per input and one column
    per stage (``original``, ``smoothed (alpha ...)``, ``rotated ...``): SmoothQuant's outlier
    picture. Each panel notes max / median, the outlier ratio smoothing and rotation shrink."""
    plt = _pyplot()
    stages: List[str] = []
    for _, panels in layers:
        for stage in panels:
            if stage not in stages:
                stages.append(stage)
    rows, cols = max(len(layers), 1), max(len(stages), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False, sharey="row")
    for r, (label, panels) in enumerate(layers):
        for c, stage in enumerate(stages):
            ax = axes[r][c]
            v = panels.get(stage)
            if v is None:
                ax.set_axis_off()
                continue
            v = np.asarray(v, dtype=np.float64)
            ax.bar(np.arange(v.size), v, width=1.0, color="C0" if c == 0 else ("C2" if c == 1 else "C3"))
            ax.set_xlim(0, v.size)
            ax.set_title(f"{label}: {stage}", fontsize=8)
            ax.text(0.98, 0.92, f"max/median {_ratio(v):.1f}x", transform=ax.transAxes, ha="right",
                    va="top", fontsize=7)
            if c == 0:
                ax.set_ylabel("max |x| per channel", fontsize=7)
            if r == rows - 1:
                ax.set_xlabel("input channel", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_errors(path, errors: Mapping[str, Mapping[str, float]], order: Optional[Sequence[str]] = None) -> None:
    """Relative output error ||Y_q - Y|| / ||Y|| of every linear, one line per scheme (log scale)."""
    plt = _pyplot()
    order = list(order) if order else sorted({n for e in errors.values() for n in e})
    fig, ax = plt.subplots(figsize=(max(7.0, 0.09 * len(order) + 3), 4.0))
    for i, (scheme, errs) in enumerate(errors.items()):
        xs = [j for j, n in enumerate(order) if n in errs]
        ys = [max(errs[order[j]], 1e-12) for j in xs]
        if xs:
            ax.plot(xs, ys, marker=".", markersize=3, linewidth=0.9, label=scheme, color=f"C{i % 10}")
    ax.set_yscale("log")
    ax.set_ylabel("relative output error ||Y_q - Y|| / ||Y||", fontsize=8)
    step = max(1, len(order) // 40)
    ax.set_xticks(range(0, len(order), step))
    ax.set_xticklabels([short_name(order[j]) for j in range(0, len(order), step)], rotation=90, fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("per-linear quantization error on calibration activations", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def perplexity(path, values: Mapping[str, float], baseline: Optional[str] = None) -> None:
    """Perplexity per scheme (horizontal bars), with the float baseline as a dashed line."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(names) + 1.4))
    y = np.arange(len(names))
    vals = [values[n] for n in names]
    ax.barh(y, vals, color=[("C7" if n == baseline else "C0") for n in names])
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
    if baseline in values:
        ax.axvline(values[baseline], color="k", linestyle="--", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (lower is better)", fontsize=8)
    ax.set_xlim(0, max(vals) * 1.18 if vals else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def group_alphas(path, alphas: Mapping[str, Mapping[str, float]], order: Optional[Sequence[str]] = None) -> None:
    """The alpha the search chose for each smoothing group, one marker series per build."""
    plt = _pyplot()
    order = list(order) if order else sorted({k for a in alphas.values() for k in a})
    fig, ax = plt.subplots(figsize=(max(7.0, 0.12 * len(order) + 3), 3.4))
    for i, (name, a) in enumerate(alphas.items()):
        xs = [j for j, k in enumerate(order) if k in a]
        ax.plot(xs, [a[order[j]] for j in xs], "o", markersize=4, label=name, color=f"C{i % 10}", alpha=0.8)
    step = max(1, len(order) // 40)
    ax.set_xticks(range(0, len(order), step))
    ax.set_xticklabels([group_label(order[j]) for j in range(0, len(order), step)], rotation=90, fontsize=6)
    ax.set_ylabel("alpha", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("per-group SmoothQuant alpha chosen by the search", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["activation_outliers", "group_alphas", "group_label", "layer_errors", "perplexity", "short_name"]
