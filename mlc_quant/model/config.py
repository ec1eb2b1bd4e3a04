"""Configuration of Llama-family models (Llama, Mistral, Qwen2), from HF or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF `architectures` entry -> whether q/k/v projections carry a bias.
SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
# GGUF `general.architecture` -> HF architecture it maps to.
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# RoPE scaling kinds that TVM's KV-cache kernels implement exactly like transformers.
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass
class LlamaConfig:  # pylint: disable=too-many-instance-attributes
    """Hyper-parameters of a Llama-family decoder (only what the graph needs)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int = 0  # 0 -> num_attention_heads (plain MHA)
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections have a bias
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "LlamaForCausalLM"
    sliding_window: int | None = None  # informational only: attention is always full

    def __post_init__(self) -> None:
        if self.num_key_value_heads == 0:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind == "default":
                self.rope_scaling = None
            elif kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"RoPE scaling {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
                )
            else:
                self.rope_scaling = {**self.rope_scaling, "rope_type": kind}

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (HF configs may list several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(int(i) for i in self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict; `LlamaConfig(**d)` round-trips it."""
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Inverse of `to_dict` (ignores unknown keys, so older/newer files still load)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike) -> LlamaConfig:
        """From a transformers `config.json` (dict, file path, or model folder)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} not found: a Hugging Face model folder needs a config.json"
                )
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        archs = config.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or config.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_HF_ARCHITECTURES)}"
            )
        if config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"{arch} with mlp_bias={config.get('mlp_bias')}, "
                f"hidden_act={config.get('hidden_act')!r} is not supported (need no MLP bias, silu)"
            )
        # transformers 5 moved rope_theta/rope_scaling into `rope_parameters`.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = config.get("rope_theta", rope.pop("rope_theta", 10000.0))
        num_heads = config["num_attention_heads"]
        use_sw = config.get("use_sliding_window", arch == "MistralForCausalLM")
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope or None,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes q/k/v biases; Llama/Mistral make them optional.
            attention_bias=SUPPORTED_HF_ARCHITECTURES[arch] or bool(config.get("attention_bias")),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            architecture=arch,
            sliding_window=config.get("sliding_window") if use_sw else None,
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> LlamaConfig:
        """From the metadata of a GGUF file (`<arch>.*` keys, llama.cpp naming)."""
        import gguf  # pylint: disable=import-outside-toplevel

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} not found")
        reader = gguf.GGUFReader(path)
        return cls.from_gguf_reader(reader)

    @classmethod
    def from_gguf_reader(cls, reader) -> LlamaConfig:
        """Same as `from_gguf` for an already opened `gguf.GGUFReader` (avoids re-reading)."""

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        arch = field("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}; supported: "
                f"{sorted(SUPPORTED_GGUF_ARCHITECTURES)}"
            )
        tensor_names = {t.name for t in reader.tensors}
        scaling = field(f"{arch}.rope.scaling.type", "none")
        if scaling != "none" or "rope_freqs.weight" in tensor_names:
            raise ValueError(
                f"GGUF RoPE scaling ({scaling}, rope_freqs) is not supported; load the Hugging "
                "Face folder of this model instead"
            )
        hidden = int(field(f"{arch}.embedding_length"))
        num_heads = int(field(f"{arch}.attention.head_count"))
        vocab = field(f"{arch}.vocab_size")
        if vocab is None:  # older files only list the tokens
            vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(field(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(field(f"{arch}.block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(field(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(field(f"{arch}.attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
            vocab_size=int(vocab),
            # llama.cpp drops output.weight when the head is tied to the embedding.
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            max_position_embeddings=int(field(f"{arch}.context_length", 2048)),
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_id=field("tokenizer.ggml.eos_token_id"),
            architecture=SUPPORTED_GGUF_ARCHITECTURES[arch],
        )
