"""The build artifact on disk, and writing it atomically.

A build directory holds:

- ``model.so``: the compiled library (``prefill``, ``decode``, ``create_paged_kv_cache``);
- ``params.safetensors``: the weights, named by the functions' weight parameters (relax.Var
  names: ``model_layers_0_self_attn_q_proj_weight.q``, ``....scale``, ...), in the standard
  safetensors layout (8-byte header length, JSON header, raw little-endian data) so any
  safetensors reader opens it; this module reads and writes it with numpy alone, so the GPU
  machine needs no extra package;
- ``mlc-quant-config.json``: model config, scheme, alpha, calibration summary, build facts;
- the tokenizer files.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Dict, Iterator, Mapping

import numpy as np

CONFIG_FILE = "mlc-quant-config.json"
PARAMS_FILE = "params.safetensors"
LIB_FILE = "model.so"

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
           "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def save_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    header, offset, arrays = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr).reshape(np.shape(arr))  # ascontiguousarray makes a 0-d array 1-d
        if arr.dtype not in _CODES:
            raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors here")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _CODES[arr.dtype.newbyteorder("=")], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def load_safetensors(path) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file (memory-mapped, read-only views)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"params file {path} not found: is this a build directory of mlc-quant?")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary directory that becomes ``output`` only if the block succeeds.

    A failed build leaves nothing behind (and an existing ``output`` untouched).
    """
    out = pathlib.Path(output).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the build is an ordinary directory
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_config(build_dir) -> dict:
    path = pathlib.Path(build_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{build_dir} is not an mlc-quant build directory (no {CONFIG_FILE}); "
                                "make one with scripts/build.py or `mlc-quant build`")
    return json.loads(path.read_text())
