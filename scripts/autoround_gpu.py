#!/usr/bin/env python3
"""AutoRound's tuning on a GPU machine that has torch and numpy but no full TVM; results come back
as the per-block checkpoints ``scripts/autoround_eval.py`` resumes from.

Three steps (docs/accuracy.md, section "AutoRound (W4, group 128)", has the exact commands):

1. ``prepare`` (here, full TVM): runs the pipeline of ``autoround_eval.py`` up to the weight
   quantizer to get exactly the params, calibration tokens and settings AutoRound would see, and
   writes a bundle: ``manifest.json`` (config, IR name -> GGUF tensor, the checkpoint fingerprint
   those inputs give), ``ids.npy`` (calibration token ids) and a copy of the pure-python ``gguf``
   package. It checks here that the GPU side's GGUF decoding gives the pipeline's float32 params
   bit for bit. The GGUF file itself travels separately (too big for one transfer: split it).
2. ``tune`` (the GPU machine, torch + numpy): decodes the GGUF, checks the fingerprint before
   any work, runs ``mlc_quant.autoround.run_autoround`` (per-block checkpoints, resumable,
   progress bar per block with ETA in the log) and exports the checkpoints compactly (int4 codes
   packed two per byte, scales, zero points, per-block stats; lzma, split into parts).
3. ``import`` (here): joins the parts and writes the checkpoints under
   ``<work-dir>/<fingerprint>/block_NNN.npz``, where ``autoround_eval.py --work-dir`` finds them:
   with every block present it does no tuning and no forward passes.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import logging
import lzma
import os
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlc_quant import autoround as ar  # noqa: E402  (numpy / torch only: no TVM)

log = logging.getLogger("mlc_quant")
PART_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB


# --------------------------------------------------------------------------- shared (no TVM)
def load_config_standalone(d: dict):
    """``LlamaConfig.from_dict(d)`` without importing ``mlc_quant.model`` (whose package imports
    tvm.relax): config.py is stdlib-only, so load that one file."""
    spec = importlib.util.spec_from_file_location("_mlc_quant_llama_config", ROOT / "mlc_quant/model/config.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses looks the module up
    spec.loader.exec_module(mod)
    return mod.LlamaConfig.from_dict(d)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """As ``mlc_quant.model.loader.unpermute_rope`` (prepare checks the results are identical)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def decode_gguf(gguf_path: str, manifest: dict) -> dict:
    """IR name -> float32 array for the tensors of ``manifest["tensors"]``, decoded as the loader does."""
    import gguf  # pylint: disable=import-outside-toplevel

    reader = gguf.GGUFReader(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for ir, spec in manifest["tensors"].items():
        t = by_name[spec["gguf"]]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if spec["unpermute"]:
            w = unpermute_rope(w, spec["unpermute"])
        w = np.array(w, dtype=np.float32, order="C", copy=True)
        if tuple(w.shape) != tuple(spec["shape"]):
            raise ValueError(f"{ir}: decoded shape {w.shape} != {spec['shape']}")
        out[ir] = w
    return out


def fmt_from(manifest: dict) -> ar.WeightFormat:
    return ar.WeightFormat(**manifest["fmt"])


def preset_from(manifest: dict) -> ar.AutoRoundPreset:
    return ar.AutoRoundPreset(**manifest["preset"])


def fingerprint(config, params, ids, manifest) -> str:
    ids64 = np.ascontiguousarray(np.asarray(ids)[:, : manifest["preset"]["seqlen"]].astype(np.int64))
    return ar._fingerprint(config, params, ids64, fmt_from(manifest), preset_from(manifest),  # pylint: disable=protected-access
                           manifest["act"], None, None, manifest["a_qmax"])


# --------------------------------------------------------------------------- prepare (full TVM)
def cmd_prepare(args) -> None:
    import dataclasses  # pylint: disable=import-outside-toplevel

    import gguf  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.datasets import calibration_samples  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model, param_name_map  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.loader import (_GGUFSource, load_config, load_params_dict,  # pylint: disable=import-outside-toplevel
                                        resolve_model)
    from mlc_quant.model.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    overrides = {k: v for k, v in {"iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                   "batch_size": args.batch_size, "lr": args.lr}.items() if v is not None}
    preset = ar.get_preset(args.preset, **overrides)
    path = resolve_model(args.model)
    config = load_config(path)
    tokenizer = load_tokenizer(path)
    params = load_params_dict(path, config, "float32")
    scheme = get_scheme(args.scheme)
    fmt = ar.weight_format(scheme)
    # what autoround_eval.py hands to the quantizer: capture it and stop
    captured = {}

    class _Stop(Exception):
        pass

    def capture(qparams, sites, plan):
        captured.update(params=qparams, plan=plan)
        raise _Stop

    mod, _ = export_model(config, "float32", "llvm")
    try:
        pipeline.quantize_module(mod, params, scheme, calibrate=None, smooth=False, quantize_weights=capture)
    except _Stop:
        pass
    plan = captured["plan"]
    if plan.explicit_inv_scales or any(v is not None for v in (plan.act_qparams or {}).values()):
        raise SystemExit(f"{scheme.name}: smoothing / activation quantization is not supported by this driver")
    qparams = captured["params"]
    samples = list(calibration_samples(args.dataset, tokenizer, config.vocab_size, preset.nsamples,
                                       preset.seqlen, seed=preset.seed))
    ids = np.stack([s[: preset.seqlen] for s in samples if s.size >= preset.seqlen][: preset.nsamples])
    src = _GGUFSource(path, config)
    hf_of = param_name_map(config)
    gguf_of = {hf: t.name for hf, t in src.tensors.items()}
    tensors = {}
    for ir in ["model_embed_tokens_weight"] + sorted(k for k in qparams if k.startswith("model_layers_")):
        hf = hf_of[ir]
        heads = 0
        if src.arch == "llama" and ".self_attn.q_proj." in hf:
            heads = config.num_attention_heads
        elif src.arch == "llama" and ".self_attn.k_proj." in hf:
            heads = config.num_key_value_heads
        tensors[ir] = {"gguf": gguf_of[hf], "unpermute": heads, "shape": list(qparams[ir].shape)}
    preset_d = dataclasses.asdict(preset)
    manifest = {"config": config.to_dict(), "fmt": dataclasses.asdict(fmt), "preset": preset_d,
                "act": scheme.act, "a_qmax": int(getattr(scheme, "a_qmax", ar.INT8_MAX)), "scheme": scheme.name,
                "dataset": args.dataset, "model": args.model, "gguf_bytes": os.path.getsize(path),
                "tensors": tensors}
    # the GPU side's decoding and config give the pipeline's params and fingerprint, bit for bit
    decoded = decode_gguf(path, manifest)
    for ir, w in decoded.items():
        if w.dtype != qparams[ir].dtype or not np.array_equal(w.view(np.uint32), qparams[ir].view(np.uint32)):
            raise SystemExit(f"decoded {ir} differs from the pipeline's params")
    cfg2 = load_config_standalone(json.loads(json.dumps(manifest["config"])))
    key = fingerprint(config, qparams, ids, manifest)
    if fingerprint(cfg2, decoded, ids, manifest) != key:
        raise SystemExit("the GPU side's fingerprint differs from the pipeline's")
    manifest["fingerprint"] = key
    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    np.save(out / "ids.npy", ids)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.copytree(os.path.dirname(gguf.__file__), out / "site" / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__", "scripts"))
    print(f"bundle {out}: {ids.shape[0]} x {ids.shape[1]} tokens of {args.dataset}, {len(tensors)} tensors, "
          f"fingerprint {key}; GGUF {path} ({os.path.getsize(path)} bytes) travels separately")


# --------------------------------------------------------------------------- tune (GPU, no TVM)
def cmd_tune(args) -> None:
    import torch  # pylint: disable=import-outside-toplevel

    bundle = pathlib.Path(args.bundle)
    sys.path.insert(0, str(bundle / "site"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    if os.path.getsize(args.gguf) != manifest["gguf_bytes"]:
        raise SystemExit(f"{args.gguf}: {os.path.getsize(args.gguf)} bytes, expected {manifest['gguf_bytes']}")
    config = load_config_standalone(manifest["config"])
    ids = np.load(bundle / "ids.npy")
    t0 = time.time()
    params = decode_gguf(args.gguf, manifest)
    key = fingerprint(config, params, ids, manifest)
    if key != manifest["fingerprint"]:
        raise SystemExit(f"fingerprint {key} != prepared {manifest['fingerprint']}: different params or tokens")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
    log.info("decoded %d tensors in %.1f s; fingerprint %s matches; tuning on %s (%s)", len(params),
             time.time() - t0, key, dev, card)
    preset = preset_from(manifest)
    report: dict = {}
    t0 = time.time()
    ar.run_autoround(config, params, list(ids), fmt_from(manifest), preset, args.work_dir, act=manifest["act"],
                     a_qmax=manifest["a_qmax"], device=dev, keep_checkpoints=True, report=report)
    wall = time.time() - t0
    report.update(card=card, torch=torch.__version__, wall_s=round(wall, 1))
    if report.get("fingerprint") != key:
        raise SystemExit("run_autoround used another fingerprint")
    if args.export:
        export(pathlib.Path(args.work_dir) / key, pathlib.Path(args.export), report, config.num_hidden_layers)
    tuned = [b for b in report["blocks"] if not b.get("resumed")]
    print(json.dumps({k: v for k, v in report.items() if k != "blocks"}))
    if tuned:
        ts = [b["tune_s"] for b in tuned]
        print(f"tuned {len(tuned)} blocks on {card}: tune_s per block {min(ts):.1f}-{max(ts):.1f} "
              f"(sum {sum(ts):.1f}), run_autoround wall {wall:.1f} s")


def export(ckdir: pathlib.Path, out: pathlib.Path, report: dict, n_layers: int) -> None:
    """Checkpoints -> ``autoround_ckpt.npz.xz.NN`` parts (int4 codes two per byte) + report json."""
    arrays, done = {}, []
    for layer in range(n_layers):
        path = ckdir / f"block_{layer:03d}.npz"
        loaded = ar._load_block(path, ar.block_linear_names(layer).values()) if path.exists() else None  # pylint: disable=protected-access
        if loaded is None:  # an interrupted run: export the finished blocks (a rerun resumes from them)
            continue
        done.append(layer)
        qres, stats = loaded
        for name, (q, scale, zp) in qres.items():
            if q.min() < 0 or q.max() > 15:
                raise SystemExit(f"{name}: codes outside 0..15, cannot pack to 4 bits")
            qq = q.astype(np.uint8)
            if qq.shape[1] % 2:
                qq = np.concatenate([qq, np.zeros((qq.shape[0], 1), np.uint8)], axis=1)
            arrays[f"{name}/q4"] = qq[:, 0::2] | (qq[:, 1::2] << 4)
            arrays[f"{name}/qcols"] = np.array(q.shape[1], np.int64)
            arrays[f"{name}/scale"], arrays[f"{name}/zp"] = scale.astype(np.float32), zp.astype(np.int16)
        arrays[f"meta/{layer}"] = np.frombuffer(json.dumps(stats).encode(), dtype=np.uint8)
    if not done:
        raise SystemExit(f"no finished block in {ckdir}")
    arrays["blocks"] = np.array(done, np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob = lzma.compress(buf.getvalue(), preset=6)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(blob), PART_BYTES):
        (out / f"autoround_ckpt.npz.xz.{i // PART_BYTES:02d}").write_bytes(blob[i:i + PART_BYTES])
    (out / "autoround_gpu_report.json").write_text(json.dumps(report, indent=1))
    log.info("exported %d of %d blocks: %d bytes npz -> %d bytes lzma, %d part(s) in %s", len(done), n_layers,
             len(buf.getvalue()),
             len(blob), (len(blob) + PART_BYTES - 1) // PART_BYTES, out)


# --------------------------------------------------------------------------- import (here)
def cmd_import(args) -> None:
    manifest = json.loads((pathlib.Path(args.bundle) / "manifest.json").read_text())
    parts = sorted(glob.glob(os.path.join(args.parts, "autoround_ckpt.npz.xz.*")))
    if not parts:
        raise SystemExit(f"no autoround_ckpt.npz.xz.* in {args.parts}")
    blob = b"".join(pathlib.Path(p).read_bytes() for p in parts)
    key = manifest["fingerprint"]
    ckdir = pathlib.Path(args.work_dir) / key
    ckdir.mkdir(parents=True, exist_ok=True)
    n_layers = manifest["config"]["num_hidden_layers"]
    with np.load(io.BytesIO(lzma.decompress(blob))) as z:
        blocks = [int(b) for b in z["blocks"]]
        for layer in blocks:
            qres = {}
            for name in ar.block_linear_names(layer).values():
                packed = z[f"{name}/q4"]
                q = np.empty((packed.shape[0], packed.shape[1] * 2), np.int32)
                q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
                qres[name] = (q[:, : int(z[f"{name}/qcols"])], z[f"{name}/scale"], z[f"{name}/zp"].astype(np.int32))
            stats = json.loads(bytes(z[f"meta/{layer}"]).decode())
            ar._save_block(ckdir / f"block_{layer:03d}.npz", qres, stats)  # pylint: disable=protected-access
    print(f"{len(blocks)} of {n_layers} block checkpoints written to {ckdir} (fingerprint {key})"
          + ("" if len(blocks) == n_layers else f"; missing: {sorted(set(range(n_layers)) - set(blocks))}"))


def cmd_export(args) -> None:
    """Export the checkpoints a (possibly interrupted) ``tune`` left in ``--work-dir``."""
    manifest = json.loads((pathlib.Path(args.bundle) / "manifest.json").read_text())
    export(pathlib.Path(args.work_dir) / manifest["fingerprint"], pathlib.Path(args.out), {"interrupted": True},
           manifest["config"]["num_hidden_layers"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="(full TVM) write the bundle the GPU side needs")
    pp.add_argument("--model", default="smollm2")
    pp.add_argument("--scheme", default="q4f16_autoround")
    pp.add_argument("--dataset", default="shakespeare")
    pp.add_argument("--preset", default="paper", choices=sorted(ar.PRESETS))
    for opt, typ in (("--iters", int), ("--nsamples", int), ("--seqlen", int), ("--batch-size", int), ("--lr", float)):
        pp.add_argument(opt, type=typ, default=None)
    pp.add_argument("--out", default=".gpu/ar/bundle")
    pt = sub.add_parser("tune", help="(torch + numpy) AutoRound every block, export the checkpoints")
    pt.add_argument("--bundle", default=".gpu/ar/bundle")
    pt.add_argument("--gguf", required=True)
    pt.add_argument("--work-dir", default="/tmp/ar/work")
    pt.add_argument("--device", default=None)
    pt.add_argument("--export", default=None, help="folder for the compact checkpoints (the device's $OUT)")
    pi = sub.add_parser("import", help="write the exported checkpoints where autoround_eval.py resumes from")
    pi.add_argument("--bundle", default=".gpu/ar/bundle")
    pi.add_argument("--parts", required=True)
    pi.add_argument("--work-dir", default="out/autoround-work")
    pe = sub.add_parser("export", help="export the checkpoints an interrupted tune left")
    pe.add_argument("--bundle", default=".gpu/ar/bundle")
    pe.add_argument("--work-dir", default="/tmp/ar/work")
    pe.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    {"prepare": cmd_prepare, "tune": cmd_tune, "export": cmd_export, "import": cmd_import}[args.cmd](args)


if __name__ == "__main__":
    main()
