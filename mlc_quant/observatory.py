"""``mlc-quant eval``: the quantization observatory.

For one model and a list of schemes it builds each scheme (``mlc_quant.build.build_model``, the
same builds as ``mlc-quant build``), measures

* perplexity per scheme on the same windows of one text (``runner.perplexity_of_build``, the very
  function ``mlc-quant ppl`` runs, so the numbers are equal);
* per linear, the relative output error ``||Y_q - Y|| / ||Y||`` of its quantized version on
  calibration activations (``mlc_quant.capture`` rows of the float model, the build's own
  quantized weights, smoothing factors and activation scales; ``mlc_quant.fakequant``);
* the per-channel activation abs-max of chosen linear inputs before and after smoothing and
  after rotation (SmoothQuant's outlier picture);
* for ``SCHEME@search`` builds, the per-group alphas the search chose and the perplexity that buys
  over the best single alpha among the listed builds of the same scheme,

and writes ``DIR/eval.json``, ``DIR/eval.md`` and PNG figures, atomically (a failure leaves no DIR).

Scheme specs: ``NAME`` (the global ``--alpha``), ``NAME@0.7`` (another global alpha),
``NAME@search`` (per-group alpha search) or ``NAME@naive`` (no smoothing).
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mlc_quant import artifact, plots
from mlc_quant.progress import progress

log = logging.getLogger("mlc_quant")

# = mlc_quant.alpha_search.DEFAULT_GRID (not imported here: that needs the TVM compiler, and the
# command line imports this module on runtime-only machines too)
DEFAULT_GRID: Tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FIGURES = {"perplexity": "perplexity.png", "layer_errors": "layer_errors.png",
           "activations": "activation_outliers.png", "alphas": "group_alphas.png"}


@dataclass(frozen=True)
class SchemeSpec:
    """One build of the evaluation: ``label`` is the spec as given (``smq_q8i8f16_0@search``)."""

    label: str
    scheme: str
    alpha: object = 0.5  # float or "search"
    smooth: bool = True

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.label)


def parse_specs(specs, default_alpha: float = 0.5) -> List[SchemeSpec]:
    """``"q0f32,smq_q8i8f16_0@search,..."`` (or a list) -> specs; unknown schemes raise ValueError."""
    from mlc_quant.schemes import get_scheme

    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise ValueError("--schemes is empty: give e.g. q0f32,smq_q8i8f16_3")
    out, seen = [], set()
    for item in items:
        name, _, suffix = item.partition("@")
        get_scheme(name)  # unknown scheme: a clear error listing the valid ones
        alpha, smooth = default_alpha, True
        if suffix in ("naive", "none", "nosmooth"):
            smooth = False
        elif suffix == "search":
            alpha = "search"
        elif suffix:
            try:
                alpha = float(suffix)
            except ValueError:
                raise ValueError(f"scheme spec {item!r}: after '@' give an alpha in [0, 1], 'search' or 'naive'") from None
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"scheme spec {item!r}: alpha must lie in [0, 1]")
        if item in seen:
            raise ValueError(f"scheme spec {item!r} is listed twice")
        seen.add(item)
        out.append(SchemeSpec(item, name, alpha, smooth))
    return out


@dataclass
class EvalOptions:
    model: str = "smollm2"
    schemes: Sequence[str] = ("q0f32", "smq_q8i8f16_3")
    text: str = "britannica"
    ctx: int = 512
    out: str = ""
    max_windows: int = 0
    overwrite: bool = False
    dataset: str = "shakespeare"
    calib_samples: int = 16
    calib_seq_len: int = 512
    calib_decode_steps: int = 4
    alpha: float = 0.5
    alpha_grid: Tuple[float, ...] = DEFAULT_GRID
    alpha_objective: str = "block"  # of NAME@search builds: block or group (mlc_quant/alpha_search.py)
    rotation: str = "none"  # rotation of every build (and of the activations the errors use)
    plot_rotation: str = "r1r2r4"  # the "after rotation" panel of the outlier figure ("none": left out)
    plot_layers: Sequence[str] = ()  # linear names whose inputs to plot; empty: chosen automatically
    sample_rows: int = 256  # calibration rows kept per linear input (memory bound)
    keep_builds: bool = False  # keep every build under DIR/builds
    seed: int = 0
    autoround_preset: str = "fast"
    command: str = field(default_factory=lambda: "mlc-quant " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                         if "eval" in sys.argv[1:] else "")


def _check(opts: EvalOptions, config) -> List[SchemeSpec]:
    """Every input error, before any heavy work (and before DIR exists)."""
    from mlc_quant.rotation import MODES
    from mlc_quant.runner import read_text

    if not opts.out:
        raise ValueError("--out DIR is required")
    specs = parse_specs(opts.schemes, opts.alpha)
    if not 0.0 <= opts.alpha <= 1.0:
        raise ValueError(f"--alpha must lie in [0, 1], got {opts.alpha}")
    if opts.ctx < 2:
        raise ValueError(f"--ctx must be at least 2, got {opts.ctx}")
    if opts.ctx > config.max_position_embeddings:
        raise ValueError(f"--ctx={opts.ctx} exceeds the model's maximum context {config.max_position_embeddings} "
                         "(max_position_embeddings)")
    if opts.calib_seq_len > config.max_position_embeddings or opts.calib_seq_len < 2:
        raise ValueError(f"--calib-seq-len={opts.calib_seq_len} must lie in [2, {config.max_position_embeddings}]")
    if opts.max_windows < 0 or opts.sample_rows < 1 or opts.calib_samples < 1:
        raise ValueError("--max-windows must be >= 0, --sample-rows and --calib-samples >= 1")
    for r in (opts.rotation, opts.plot_rotation):
        if r not in MODES:
            raise ValueError(f"unknown rotation {r!r}; valid: {', '.join(MODES)}")
    read_text(opts.text)  # missing or empty text file: FileNotFoundError / ValueError now
    if pathlib.Path(opts.out).exists() and not opts.overwrite:
        raise FileExistsError(f"output directory {pathlib.Path(opts.out).resolve()} exists; pass --overwrite to replace it")
    return specs


class _FloatModel:
    """The exported float model (optionally rotated), its params and captured activations."""

    def __init__(self, config, path, rot_mode: str, seed: int):
        from mlc_quant import rotation
        from mlc_quant.model.llama import export_model
        from mlc_quant.model.loader import load_params_dict
        from mlc_quant.passes import module_linears
        from mlc_quant.pipeline import annotate

        mod, _ = export_model(config, "float32", "llvm")
        params = load_params_dict(path, config, "float32")
        rot = rotation.Rotation(rot_mode, "hadamard", seed)
        mod, params, _ = rotation.rotate_model(mod, params, config, rot)
        self.mod = annotate(mod, params)
        self.params = params
        self.layouts = {s.name: s.transposed for ss in module_linears(self.mod).values() for s in ss}
        self.captured = None

    def capture(self, opts: EvalOptions, config, tokenizer):
        from mlc_quant.capture import capture_activations
        from mlc_quant.datasets import calibration_samples

        samples = calibration_samples(opts.dataset, tokenizer, config.vocab_size, opts.calib_samples,
                                      opts.calib_seq_len, seed=opts.seed)
        self.captured = capture_activations(self.mod, self.params, samples, opts.calib_samples,
                                            max_rows=opts.sample_rows, seed=opts.seed,
                                            max_seq_len=opts.calib_seq_len, vocab_size=config.vocab_size)
        return self.captured


def _choose_layers(captured, groups, wanted: Sequence[str]) -> List[str]:
    """Input keys to plot: those of the named linears, or (auto) the input with the largest
    max/median abs-max ratio, layer 0's attention input, and the worst down_proj input."""
    if wanted:
        keys = []
        for name in wanted:
            try:
                key = captured.key_of(name)
            except KeyError:
                raise ValueError(f"--plot-layers: {name!r} is not a linear of the model "
                                 f"(e.g. {captured.linears()[:3]})") from None
            if key not in keys:
                keys.append(key)
        return keys
    smoothable = {",".join(sorted(g.linears)) for g in groups if g.fold != "skip"}
    cands = [k for k in captured.absmax if k in smoothable] or list(captured.absmax)

    def ratio(k):
        v = captured.absmax[k]
        med = float(np.median(v))
        return float(np.max(v)) / med if med > 0 else 0.0

    picks = [max(cands, key=ratio)]
    first_attn = [k for k in cands if "q_proj" in k]
    downs = [k for k in cands if "down_proj" in k]
    if first_attn:
        picks.append(first_attn[0])
    if downs:
        picks.append(max(downs, key=ratio))
    return list(dict.fromkeys(picks))[:3]


def _outlier_panels(keys, plain: _FloatModel, rotated: Optional[_FloatModel], alpha: float, rot_mode: str):
    from mlc_quant.smoothing import linear_weight_nk, smoothing_factors

    layers = []
    for key in keys:
        a = plain.captured.absmax[key]
        weights = [linear_weight_nk(plain.params[n], plain.layouts[n]) for n in key.split(",")]
        s = smoothing_factors(a, weights, alpha)
        panels = {"original": a, f"smoothed (alpha {alpha:g})": a / s}
        if rotated is not None and key in rotated.captured.absmax:
            panels[f"rotated ({rot_mode})"] = rotated.captured.absmax[key]
        layers.append((plots.group_label(key), panels))
    return layers


def _stats(v: np.ndarray) -> Dict[str, float]:
    v = np.asarray(v, dtype=np.float64)
    med = float(np.median(v))
    return {"max": float(v.max()), "median": med, "max_over_median": float(v.max() / med) if med > 0 else None}


def run_eval(opts: EvalOptions) -> Dict:
    """Run the observatory; returns what it writes to ``DIR/eval.json``."""
    from mlc_quant import fakequant
    from mlc_quant.build import BuildOptions, build_model
    from mlc_quant.model.loader import load_config, resolve_model
    from mlc_quant.model.tokenizer import load_tokenizer
    from mlc_quant.passes.smooth_linear import find_smoothing_groups
    from mlc_quant.rotation import check_supported, Rotation
    from mlc_quant.runner import perplexity_of_build
    from mlc_quant.schemes import get_scheme

    t_start = time.time()
    path = resolve_model(opts.model)
    config = load_config(path)
    specs = _check(opts, config)
    check_supported(config, Rotation(opts.rotation))
    plot_rot = opts.plot_rotation
    if plot_rot != "none":
        try:
            check_supported(config, Rotation(plot_rot))
        except ValueError as err:
            log.warning("no rotated panel in the outlier figure: %s", err)
            plot_rot = "none"
    tokenizer = load_tokenizer(path)
    result: Dict = {"perplexity": {}, "layer_error": {}, "layer_error_summary": {}, "builds": {}}
    with artifact.atomic_output_dir(opts.out, opts.overwrite) as tmp:
        scratch = None if opts.keep_builds else tempfile.mkdtemp(prefix=".eval-builds-", dir=tmp.parent)
        builds_dir = tmp / "builds" if opts.keep_builds else pathlib.Path(scratch)
        try:
            # 1. calibration activations of the float model(s)
            model = _FloatModel(config, path, opts.rotation, opts.seed)
            model.capture(opts, config, tokenizer)
            plain = model if opts.rotation == "none" else _FloatModel(config, path, "none", opts.seed)
            if plain is not model:
                plain.capture(opts, config, tokenizer)
            rotated = None
            if plot_rot != "none":
                rotated = model if plot_rot == opts.rotation else _FloatModel(config, path, plot_rot, opts.seed)
                if rotated.captured is None:
                    rotated.capture(opts, config, tokenizer)
                    rotated.params, rotated.captured.rows = {}, {}  # only its abs-max is plotted
            order = model.captured.linears()
            groups = find_smoothing_groups(plain.mod)
            model_groups = groups if plain is model else find_smoothing_groups(model.mod)

            # 2. every scheme: build (errors measured inside), perplexity
            summaries, windows = {}, None
            for spec in progress(specs, desc="eval builds", unit="scheme"):
                scheme = get_scheme(spec.scheme)
                t0 = time.time()

                def on_quantized(res, spec=spec, scheme=scheme):
                    summary = {k: v for k, v in res.summary.items() if k != "activation_scales"}
                    summaries[spec.label] = summary
                    if scheme.quantizes:
                        result["layer_error"][spec.label] = fakequant.layer_errors(
                            scheme, model.captured, model.params, model.layouts, res.params, res.inv_scales,
                            res.plan.act_qparams, fakequant.fold_out_scales(model_groups, res.inv_scales))

                out = builds_dir / spec.dirname
                build_model(BuildOptions(model=opts.model, quantization=spec.scheme, output=str(out),
                                         alpha=spec.alpha, alpha_grid=tuple(opts.alpha_grid),
                                         alpha_objective=opts.alpha_objective,
                                         alpha_rows=opts.sample_rows, smooth=spec.smooth, max_seq_len=opts.ctx,
                                         dataset=opts.dataset, calib_samples=opts.calib_samples,
                                         calib_seq_len=opts.calib_seq_len, calib_decode_steps=opts.calib_decode_steps,
                                         overwrite=True, seed=opts.seed, rotation=opts.rotation,
                                         autoround_preset=opts.autoround_preset),
                            on_quantized=on_quantized, capture=lambda mod, params: model.captured)
                t_build = time.time() - t0
                t0 = time.time()
                ppl, windows = perplexity_of_build(out, opts.text, opts.ctx, opts.max_windows)
                result["perplexity"][spec.label] = ppl
                result["builds"][spec.label] = {"scheme": spec.scheme, "alpha": spec.alpha if spec.smooth else None,
                                                "smooth": spec.smooth, "build_s": round(t_build, 1),
                                                "eval_s": round(time.time() - t0, 1),
                                                "quantization": summaries.get(spec.label, {})}
                log.info("%s: perplexity %.4f (build %.0f s)", spec.label, ppl, t_build)
                if not opts.keep_builds:
                    shutil.rmtree(out, ignore_errors=True)

            # 3. summaries, alpha search, figures, report
            for label, errs in result["layer_error"].items():
                if errs:
                    worst = max(errs, key=errs.get)
                    result["layer_error_summary"][label] = {"mean": float(np.mean(list(errs.values()))),
                                                            "max": errs[worst], "worst": worst}
            base = result["perplexity"].get("q0f32")
            if base:
                result["perplexity_vs_q0f32"] = {k: v / base - 1 for k, v in result["perplexity"].items()}
            result["alpha_search"] = _alpha_search_report(specs, result, summaries)
            keys = _choose_layers(plain.captured, groups, opts.plot_layers)
            layers = _outlier_panels(keys, plain, rotated, opts.alpha, plot_rot)
            result["activation_outliers"] = {plots.group_label(k): {stage: _stats(v) for stage, v in panels.items()}
                                             for k, (_, panels) in zip(keys, layers)}
            plots.perplexity(tmp / FIGURES["perplexity"], result["perplexity"], baseline="q0f32")
            plots.layer_errors(tmp / FIGURES["layer_errors"], result["layer_error"], order)
            plots.activation_outliers(tmp / FIGURES["activations"], layers)
            figures = [FIGURES["perplexity"], FIGURES["layer_errors"], FIGURES["activations"]]
            searched = {k: v["group_alphas"] for k, v in result["alpha_search"].items()}
            if searched:
                plots.group_alphas(tmp / FIGURES["alphas"], searched,
                                   [k for k in model.captured.rows if any(k in a for a in searched.values())])
                figures.append(FIGURES["alphas"])
            result["figures"] = figures
            result["setup"] = {
                "model": opts.model, "text": opts.text, "ctx": opts.ctx, "windows": windows,
                "max_windows": opts.max_windows,
                "calibration": {"dataset": opts.dataset, "samples": opts.calib_samples,
                                "seq_len": opts.calib_seq_len, "decode_steps": opts.calib_decode_steps,
                                "seed": opts.seed, "rows_per_linear_input": opts.sample_rows},
                "alpha": opts.alpha, "alpha_grid": list(opts.alpha_grid),
                "alpha_objective": opts.alpha_objective, "rotation": opts.rotation,
                "plot_rotation": plot_rot, "command": opts.command,
                "total_s": round(time.time() - t_start, 1),
            }
            (tmp / "eval.json").write_text(json.dumps(_jsonable(result), indent=2))
            (tmp / "eval.md").write_text(render_markdown(result, order))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    log.info("wrote %s in %.0f s", opts.out, time.time() - t_start)
    return result


def _alpha_search_report(specs: List[SchemeSpec], result: Dict, summaries: Dict) -> Dict:
    """Per ``@search`` build: chosen alphas, objective, and perplexity vs the best single alpha."""
    out = {}
    ppl = result["perplexity"]
    for spec in specs:
        if spec.alpha != "search" or not spec.smooth:
            continue
        summary = summaries.get(spec.label, {})
        report = dict(summary.get("alpha_search", {}))
        entry = {"group_alphas": summary.get("group_alphas", {}), "objective": report.get("objective"),
                 "mse_sum": report.get("mse_sum"), "mse_sum_global": report.get("mse_sum_global"),
                 "global_alpha": report.get("global_alpha"), "grid": report.get("grid"),
                 "perplexity": ppl.get(spec.label)}
        singles = {s.label: s.alpha for s in specs
                   if s.scheme == spec.scheme and s.smooth and isinstance(s.alpha, float) and s.label in ppl}
        if singles:
            best = min(singles, key=lambda k: ppl[k])
            entry.update({"best_single": best, "best_single_alpha": singles[best],
                          "best_single_perplexity": ppl[best],
                          "perplexity_gain": ppl[best] - ppl[spec.label]})
        out[spec.label] = entry
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def render_markdown(result: Dict, order: Sequence[str] = ()) -> str:
    """``eval.md``: the tables of eval.json with the figures."""
    setup = result.get("setup", {})
    cal = setup.get("calibration", {})
    lines = [f"# Quantization observatory: {setup.get('model')}", "",
             f"Text `{setup.get('text')}`, {setup.get('windows')} windows x {setup.get('ctx')} tokens "
             f"(same windows for every scheme, = `mlc-quant ppl --ctx {setup.get('ctx')}`); calibration "
             f"{cal.get('dataset')}, {cal.get('samples')} x {cal.get('seq_len')} tokens, "
             f"{cal.get('rows_per_linear_input')} sampled rows per linear input; alpha {setup.get('alpha')}, "
             f"rotation {setup.get('rotation')}.", "",
             f"Command: `{setup.get('command')}`", "", "## Perplexity", "",
             "| scheme | perplexity | vs q0f32 | mean layer error | max layer error (linear) | build s |",
             "|---|---|---|---|---|---|"]
    rel = result.get("perplexity_vs_q0f32", {})
    for label, value in result["perplexity"].items():
        summ = result["layer_error_summary"].get(label)
        err = (f"{summ['mean']:.4f} | {summ['max']:.4f} ({plots.short_name(summ['worst'])})" if summ else " | ")
        r = f"{rel[label] * 100:+.2f}%" if label in rel and label != "q0f32" else ""
        lines.append(f"| {label} | {value:.4f} | {r} | {err} | {result['builds'][label]['build_s']:.0f} |")
    lines += ["", f"![perplexity]({FIGURES['perplexity']})", "", "## Per-layer quantization error", "",
              "Relative output error ||Y_q - Y|| / ||Y|| of each linear alone, with the scheme's weights, smoothing "
              "and activation quantization, on calibration activations of the float model (biases left out).", "",
              f"![layer errors]({FIGURES['layer_errors']})", ""]
    for label, errs in result["layer_error"].items():
        worst = sorted(errs, key=errs.get, reverse=True)[:5]
        if worst:
            lines.append(f"- {label}: worst " + ", ".join(f"{plots.short_name(n)} {errs[n]:.4f}" for n in worst))
    lines += ["", "## Activation outliers", "",
              "Per-channel max |x| of chosen linear inputs on the calibration data: as captured, divided by the "
              "SmoothQuant factors, and in the rotated model.", "",
              f"![activation outliers]({FIGURES['activations']})", "",
              "| input | stage | max | median | max / median |", "|---|---|---|---|---|"]
    for name, stages in result.get("activation_outliers", {}).items():
        for stage, st in stages.items():
            ratio = f"{st['max_over_median']:.1f}" if st["max_over_median"] is not None else "-"
            lines.append(f"| {name} | {stage} | {st['max']:.3g} | {st['median']:.3g} | {ratio} |")
    search = result.get("alpha_search", {})
    if search:
        lines += ["", "## Per-group alpha search", "",
                  "Grid per smoothing group, minimising the decoder block's output MSE with the group quantized "
                  "(`--alpha-objective block`; the group's own output MSE for the LM head's group, rotated "
                  "builds and `--alpha-objective group`), mlc_quant/alpha_search.py.", "",
                  "| build | perplexity | best single alpha (perplexity) | gain | summed MSE: search / global alpha |",
                  "|---|---|---|---|---|"]
        for label, e in search.items():
            single = (f"{e['best_single_alpha']:g} ({e['best_single_perplexity']:.4f})" if "best_single" in e
                      else "(none listed)")
            gain = f"{e['perplexity_gain']:+.4f}" if "perplexity_gain" in e else ""
            mse = (f"{e['mse_sum']:.4g} / {e['mse_sum_global']:.4g}" if e.get("mse_sum") is not None else "")
            lines.append(f"| {label} | {e['perplexity']:.4f} | {single} | {gain} | {mse} |")
        lines += ["", f"![group alphas]({FIGURES['alphas']})"]
    return "\n".join(lines) + "\n"


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2", help="bundled name (smollm2), a .gguf file or a Hugging Face folder")
    p.add_argument("--schemes", required=True,
                   help="comma-separated scheme specs: NAME, NAME@ALPHA, NAME@search (per-group alpha search), "
                        "NAME@naive (no smoothing); e.g. q0f32,smq_q8i8f16_0,smq_q8i8f16_0@search,q4f16_autoround")
    p.add_argument("--text", required=True, help="a text file, or 'britannica' (as mlc-quant ppl)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--out", required=True, help="output directory: eval.json, eval.md, PNG figures")
    p.add_argument("--max-windows", type=int, default=0, help="evaluate only the first N windows (0 = all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dataset", default="shakespeare", help="calibration data (as mlc-quant build; default shakespeare)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calib-decode-steps", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5, help="global SmoothQuant alpha of NAME specs (default 0.5)")
    p.add_argument("--alpha-grid", default=",".join(f"{a:g}" for a in DEFAULT_GRID), help="grid of NAME@search")
    p.add_argument("--alpha-objective", default="block", choices=["block", "group"],
                   help="what NAME@search minimises: block (decoder block output MSE) or group (group output MSE)")
    p.add_argument("--rotation", default="none", choices=["none", "r1r2", "r1r2r4", "all"],
                   help="rotation of every build (default none)")
    p.add_argument("--plot-rotation", default="r1r2r4", choices=["none", "r1r2", "r1r2r4", "all"],
                   help="rotation of the outlier figure's last panel (default r1r2r4; none: no panel)")
    p.add_argument("--plot-layers", default="", help="comma-separated linear names whose inputs to plot (default: auto)")
    p.add_argument("--sample-rows", type=int, default=256, help="calibration rows kept per linear input (default 256)")
    p.add_argument("--keep-builds", action="store_true", help="keep every build under DIR/builds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoround-preset", default="fast", choices=["fast", "paper"])


def main(args) -> int:
    from mlc_quant.alpha_search import parse_grid

    opts = EvalOptions(model=args.model, schemes=args.schemes, text=args.text, ctx=args.ctx, out=args.out,
                       max_windows=args.max_windows, overwrite=args.overwrite, dataset=args.dataset,
                       calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                       calib_decode_steps=args.calib_decode_steps, alpha=args.alpha,
                       alpha_grid=parse_grid(args.alpha_grid), alpha_objective=args.alpha_objective,
                       rotation=args.rotation,
                       plot_rotation=args.plot_rotation,
                       plot_layers=[s for s in args.plot_layers.split(",") if s.strip()],
                       sample_rows=args.sample_rows, keep_builds=args.keep_builds, seed=args.seed,
                       autoround_preset=args.autoround_preset)
    result = run_eval(opts)
    for label, value in result["perplexity"].items():
        print(f"{label:32s} perplexity {value:.4f}")
    print(f"wrote {opts.out}")
    return 0
