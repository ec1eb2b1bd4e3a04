"""Tokenizer of a model: from a GGUF file's metadata or a Hugging Face folder."""

from __future__ import annotations

import os

from .loader import is_gguf, resolve_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(name_or_path: str | os.PathLike):
    """A transformers tokenizer for a bundled name, a .gguf file or an HF / saved folder."""
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    path = resolve_model(name_or_path)
    if is_gguf(path):
        # transformers rebuilds a fast tokenizer from the tokenizer.ggml.* metadata.
        folder, filename = os.path.split(os.path.abspath(path))
        return AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    if not os.path.isdir(path) or not any(
        os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected one of {_TOKENIZER_FILES} (or a .gguf file); "
            "copy the tokenizer files of the original model there"
        )
    return AutoTokenizer.from_pretrained(path)


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Save the tokenizer (tokenizer.json + config) so `load_tokenizer(out_dir)` reads it back."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(os.fspath(out_dir))
