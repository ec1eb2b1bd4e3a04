"""AnnotateLinear: record every linear op of every Relax function under a stable name."""
from __future__ import annotations

from typing import Iterable, Optional

import tvm
from tvm import IRModule, relax

from ._linear import LINEARS_ATTR, find_linears


@tvm.transform.module_pass(opt_level=0, name="mlc_quant.AnnotateLinear")
class AnnotateLinear:
    """Write the names of a function's linears into its ``mlc_quant.linears`` attribute.

    A linear is ``matmul(x, permute_dims(w))`` with ``w`` a 2-D weight parameter, or
    ``matmul(x, w)`` with ``w`` a named weight. Its name is the weight's name, so functions that
    share weights (prefill and decode) share names and their statistics merge.

    Parameters
    ----------
    weight_names : Optional[Iterable[str]]
        Parameter names that are weights. Default: the parameters after ``num_input`` for
        ``nn.Module`` exports, else any 2-D parameter used transposed as a matmul's right side.
    """

    def __init__(self, weight_names: Optional[Iterable[str]] = None):
        self.weight_names = None if weight_names is None else sorted(weight_names)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            names = []
            for site in find_linears(gvar.name_hint, func, self.weight_names):
                if site.name not in names:
                    names.append(site.name)
            if names:
                updates[gvar] = func.with_attr(LINEARS_ATTR, names)
        if not updates:
            return mod
        builder = relax.BlockBuilder(mod)  # copy-on-write: the input module stays untouched
        for gvar, func in updates.items():
            builder.update_func(gvar, func)
        return builder.get()
