"""Shared test fixtures: tiny random Llama-family checkpoints and the product's CPU build."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tvm

from mlc_quant import pipeline

# ----------------------------------------------------------------------------- CPU build


def build_cpu(mod: tvm.IRModule, target: str = "llvm") -> tvm.runtime.Executable:
    """The product's CPU build (scheduled matmuls: the default llvm build is ~20x slower)."""
    return pipeline.build(mod, target)


# ----------------------------------------------------------------------------- tiny models

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "rope_theta": 1000.0,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.2,  # larger than default: distinct logits, no greedy near-ties
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def make_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random transformers model (float32, eval mode) of the tiny config."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    kwargs = {**TINY, **overrides}
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kwargs)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**kwargs)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms/biases start at 1/0: randomize so loading them is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def save_hf_model(model, folder: str, **save_kwargs) -> str:
    model.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """HF folder (config.json + model.safetensors) of a tiny GQA Llama, untied head."""
    folder = str(tmp_path_factory.mktemp("tiny_llama"))
    return save_hf_model(make_hf_model("llama", tie_word_embeddings=False), folder)


@pytest.fixture(scope="session")
def tiny_config_dict(tiny_llama_dir):
    with open(os.path.join(tiny_llama_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
