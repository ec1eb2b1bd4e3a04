"""CPU matmul schedule (mlc_quant.cpu_schedule): results vs numpy, and that the rule applied."""

import numpy as np
import pytest
import tvm
from tvm import relax

from mlc_quant.cpu_schedule import schedule_for_cpu

TARGET = tvm.target.Target({"kind": "llvm"})
RNG = np.random.default_rng(0)


def _linear_mod(m, k, n, dtype, *, quant=False):
    """main(x[1, m, k], w[n, k]) = matmul(x, permute_dims(w)), as our nn.Linear exports it.

    quant: x fp32 -> quantize (int8) -> int8 x int8 -> int32 matmul -> dequantize (fp32).
    """
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, m, k], "float32" if quant else dtype))
    w = relax.Var("w", relax.TensorType([n, k], "int8" if quant else dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            a = x
            if quant:
                a = bb.emit(relax.op.quantize(x, relax.const(0.05, "float32"),
                                              relax.const(0, "int8"), axis=-1, out_dtype="int8"))
            out_dtype = "int32" if quant or dtype == "int8" else ""
            y = bb.emit(relax.op.matmul(a, relax.op.permute_dims(w), out_dtype=out_dtype))
            if quant:
                y = bb.emit(relax.op.dequantize(y, relax.const(0.01, "float32"),
                                                relax.const(0, "int32"), axis=-1,
                                                out_dtype="float32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _build(mod):
    scheduled = schedule_for_cpu(mod, TARGET)
    return scheduled, relax.VirtualMachine(tvm.compile(scheduled, TARGET), tvm.cpu())


def _matmul_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint}


def _has_parallel_loop(func) -> bool:
    return "T.parallel(" in func.script()


def _random(shape, dtype):
    if dtype == "int8":
        return RNG.integers(-128, 128, shape).astype("int8")
    return RNG.standard_normal(shape).astype(dtype)


def _check(vm, xn, wn, *, exact):
    out = vm["main"](tvm.runtime.tensor(xn), tvm.runtime.tensor(wn)).numpy()
    wide = "int64" if exact else "float64"
    ref = np.einsum("bmk,nk->bmn", xn.astype(wide), wn.astype(wide))
    if exact:
        np.testing.assert_array_equal(out.astype("int64"), ref)
    else:
        tol = 1e-5 if xn.dtype == np.float32 else 2e-2
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_symbolic_m(dtype):
    m = tvm.tirx.Var("m", "int64")
    mod, vm = _build(_linear_mod(m, 576, 1536, dtype))
    (func,) = _matmul_funcs(mod).values()
    assert func.attrs["tirx.is_scheduled"] and _has_parallel_loop(func)
    wn = _random((1536, 576), dtype)
    for rows in (1, 7, 128, 513):
        _check(vm, _random((1, rows, 576), dtype), wn, exact=dtype == "int8")


@pytest.mark.parametrize("dtype", ["float32", "int8", "float16"])
@pytest.mark.parametrize("m,k,n", [(1, 576, 192), (12, 192, 576), (128, 64, 40)])
def test_static_shapes(dtype, m, k, n):
    # (1, ...) is a decode GEMV; n=40 is not a multiple of the 16-wide tile.
    _, vm = _build(_linear_mod(m, k, n, dtype))
    _check(vm, _random((1, m, k), dtype), _random((n, k), dtype), exact=dtype == "int8")


def test_quantize_prologue_dequantize_epilogue():
    m = tvm.tirx.Var("m", "int64")
    mod, vm = _build(_linear_mod(m, 192, 576, "int8", quant=True))
    funcs = _matmul_funcs(mod)
    assert any(_has_parallel_loop(f) for f in funcs.values()), list(funcs)
    wn = _random((576, 192), "int8")
    for rows in (1, 7, 130):
        xn = (RNG.standard_normal((1, rows, 192)) * 3).astype("float32")
        out = vm["main"](tvm.runtime.tensor(xn), tvm.runtime.tensor(wn)).numpy()
        # quantize rounds half to even on llvm (nearbyint), like np.rint
        q = np.clip(np.rint(xn / np.float32(0.05)), -128, 127).astype("int64")
        acc = np.einsum("bmk,nk->bmn", q, wn.astype("int64"))
        np.testing.assert_allclose(out, acc.astype("float32") * np.float32(0.01), rtol=1e-6)


def test_silu_multiply_epilogue():
    # silu(x @ w.T) * u as in the MLP: the epilogue reads the matmul output twice
    # (x * sigmoid(x)), which TVM 0.27's reverse_compute_inline mishandles.
    m = tvm.tirx.Var("m", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, m, 64], "float32"))
    w = relax.Var("w", relax.TensorType([96, 64], "float32"))
    u = relax.Var("u", relax.TensorType([1, m, 96], "float32"))
    with bb.function("main", [x, w, u]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.silu(relax.op.matmul(x, relax.op.permute_dims(w))))
            out = bb.emit_output(bb.emit(relax.op.multiply(y, u)))
        bb.emit_func_output(out)
    mod, vm = _build(bb.get())
    assert any(_has_parallel_loop(f) for f in _matmul_funcs(mod).values())
    wn = _random((96, 64), "float32")
    for rows in (1, 5, 33):
        xn, un = _random((1, rows, 64), "float32"), _random((1, rows, 96), "float32")
        out = vm["main"](*(tvm.runtime.tensor(a) for a in (xn, wn, un))).numpy()
        y = xn.astype("float64") @ wn.T.astype("float64")
        np.testing.assert_allclose(out, y / (1 + np.exp(-y)) * un, rtol=1e-5, atol=1e-5)
