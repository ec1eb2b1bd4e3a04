"""Progress bars for long work (calibration, weight conversion, builds)."""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr; ``MLC_QUANT_PROGRESS=0`` silences it, ``=1`` forces it on."""
    flag = os.environ.get("MLC_QUANT_PROGRESS")
    disable = {"0": True, "1": False}.get(flag, None)  # None: only when stderr is a terminal
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable, **kwargs)
