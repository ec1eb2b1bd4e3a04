"""Llama-family models (Llama, Mistral, Qwen2) in Relax: config, graph, weights, tokenizer."""

from .config import LlamaConfig
from .llama import (
    MODEL_FUNCTIONS,
    LlamaForCausalLM,
    export_model,
    ir_param_name,
    param_name_map,
    param_shapes,
)
from .loader import load_config, load_params, load_params_dict, resolve_model
from .tokenizer import load_tokenizer, save_tokenizer

__all__ = [
    "MODEL_FUNCTIONS",
    "LlamaConfig",
    "LlamaForCausalLM",
    "export_model",
    "ir_param_name",
    "load_config",
    "load_params",
    "load_params_dict",
    "load_tokenizer",
    "param_name_map",
    "param_shapes",
    "resolve_model",
    "save_tokenizer",
]
