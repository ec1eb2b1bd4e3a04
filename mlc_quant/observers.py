"""Running per-channel statistics (torchao-style observers): O(channels) memory, one pass."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np

_MERGE = {"absmax": np.maximum, "max": np.maximum, "min": np.minimum}


class ChannelStatsObserver:
    """Merges per-channel ``absmax``/``min``/``max`` vectors of each linear across batches.

    Each update folds a new vector into the running one with elementwise max (or min), so the
    result equals the statistic over the concatenation of all batches, whatever their split
    (batch-invariance), and memory stays one vector per (linear, kind).
    """

    def __init__(self):
        self._stats: Dict[str, Dict[str, np.ndarray]] = {}
        self.num_updates = 0

    def update(self, name: str, kind: str, value: np.ndarray) -> None:
        if kind not in _MERGE:
            raise ValueError(f"unknown statistic {kind!r}; valid: {sorted(_MERGE)}")
        value = np.asarray(value, dtype=np.float32)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"non-finite activation statistic for linear {name!r} ({kind}): the model "
                             "produced NaN/Inf on a calibration input; check the inputs and the weights")
        per_linear = self._stats.setdefault(name, {})
        old = per_linear.get(kind)
        if old is not None and old.shape != value.shape:
            raise ValueError(f"linear {name!r}: statistic {kind} has {value.shape[0]} channels, "
                             f"earlier {old.shape[0]}")
        per_linear[kind] = value.copy() if old is None else _MERGE[kind](old, value)

    def update_from_outputs(self, stat_names: Iterable[str], values: Iterable[np.ndarray]) -> None:
        """Fold one function call's stat outputs (names ``"<linear>:<kind>"``)."""
        seen = set()
        for key, value in zip(stat_names, values):
            if key in seen:
                continue
            seen.add(key)
            name, kind = key.rsplit(":", 1)
            self.update(name, kind, value)
        self.num_updates += 1

    def stats(self, name: str) -> Dict[str, np.ndarray]:
        if name not in self._stats:
            raise KeyError(f"no statistics for linear {name!r}: it never ran during calibration")
        return self._stats[name]

    def get(self, name: str) -> Optional[Dict[str, np.ndarray]]:
        return self._stats.get(name)

    def names(self):
        return list(self._stats)

    def as_dict(self) -> Dict[str, Dict[str, np.ndarray]]:
        return {n: dict(k) for n, k in self._stats.items()}

    def nbytes(self) -> int:
        return sum(v.nbytes for kinds in self._stats.values() for v in kinds.values())
