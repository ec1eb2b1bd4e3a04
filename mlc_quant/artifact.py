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
from typing import Callable, Dict, Iterator, Mapping, Sequence, Tuple

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
    blob = _header_blob(header, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def _header_blob(header: dict, metadata: Mapping[str, str] | None) -> bytes:
    if metadata:
        header = {**header, "__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # align the data to 8 bytes


def save_safetensors_streamed(path, specs: Sequence[Tuple[str, np.dtype, Tuple[int, ...]]],
                              read: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """``save_safetensors`` one tensor at a time: ``specs`` (name, dtype, shape) make the header,
    then ``read(name)`` gives each tensor as it is written, so the host holds one tensor, not the
    model (the layer-streamed build assembles ``params.safetensors`` from per-block shards)."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        dtype = np.dtype(dtype)
        if dtype not in _CODES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors here")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    with open(path, "wb") as f:
        blob = _header_blob(header, metadata)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            arr = np.asarray(read(name))
            if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: read gave {arr.dtype}{list(arr.shape)}, the header says "
                                 f"{np.dtype(dtype)}{list(shape)}")
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def safetensors_header(path) -> Dict[str, dict]:
    """Tensor name -> {dtype (numpy), shape, offset (absolute, bytes), nbytes} of a safetensors file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: {"dtype": np.dtype(_DTYPES[info["dtype"]]), "shape": tuple(info["shape"]),
                   "offset": 8 + n + info["data_offsets"][0],
                   "nbytes": info["data_offsets"][1] - info["data_offsets"][0]}
            for name, info in header.items()}


def read_tensor(path, info: Mapping) -> np.ndarray:
    """One tensor of a safetensors file (an entry of :func:`safetensors_header`), read into memory
    (not memory-mapped: the pages do not stay mapped into the process)."""
    with open(path, "rb") as f:
        f.seek(info["offset"])
        data = f.read(info["nbytes"])
    dtype = info["dtype"].newbyteorder("<")
    return np.frombuffer(data, dtype=dtype).astype(info["dtype"], copy=True).reshape(info["shape"])


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
