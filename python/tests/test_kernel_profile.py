"""mlc_quant.bench.kernel_profile's aggregation (names, per-kernel sums, GPU idle gaps) on fake
CUPTI events (the real profile needs a GPU; the bench run on the device exercises it)."""
from __future__ import annotations

import types

import pytest

from mlc_quant import bench

torch = pytest.importorskip("torch")


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


def test_kernel_kind_groups_layers_and_templates():
    assert bench.kernel_kind("fused_add3_kernel") == "fused_add_kernel"
    assert bench.kernel_kind("void cutlass::device_kernel<Gemm<1, 2>>(Params)") == "cutlass::device_kernel"
    assert bench.kernel_kind("rms_norm_kernel") == "rms_norm_kernel"
    assert bench.kernel_kind("void ns::(anonymous namespace)::RmsNorm<true, 2>(P)") == "ns::RmsNorm"


def test_sums_and_idle_gaps(monkeypatch):
    from torch.autograd import DeviceType  # pylint: disable=import-outside-toplevel

    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [  # (device, name, start us, end us): kernel A, a 5 us gap, B overlapping C, a 30 us gap, A
        (cuda, "void a<int>(x)", 0, 10), (cuda, "b_kernel", 15, 40), (cuda, "c_kernel", 20, 30),
        (cuda, "void a<int>(x)", 70, 80), (cpu, "host_op", 0, 100), (cpu, "cudaLaunchKernelExC", -4, -1),
    ]
    evs = [types.SimpleNamespace(device_type=d, name=n, time_range=_Range(s, e)) for d, n, s, e in events]

    class FakeProfile:  # pylint: disable=too-few-public-methods
        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def events(self):
            return evs

    import torch.profiler  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(synchronize=lambda: None))
    out = bench.kernel_profile(lambda: None, fake_torch)
    assert out["kernels"] == 4
    assert out["kernel_ms"] == pytest.approx((10 + 25 + 10 + 10) / 1e3)
    assert out["span_ms"] == pytest.approx(80 / 1e3)
    assert out["idle_ms"] == pytest.approx((5 + 30) / 1e3)
    assert out["idle_after"] == [{"kernel": "b_kernel", "ms": 0.03}, {"kernel": "a", "ms": 0.005}]
    # the timeline from the first CUDA API call: host launches and kernels, in order (other host ops not)
    assert [(e["t_us"], e["side"], e["name"]) for e in out["first_events"]] == [
        (0.0, "host", "cudaLaunchKernelExC"), (4.0, "device", "a"), (19.0, "device", "b_kernel"),
        (24.0, "device", "c_kernel"), (74.0, "device", "a")]
    assert out["first_api_to_first_kernel_ms"] == pytest.approx(0.004)
    top = {r["kernel"]: r for r in out["top"]}
    assert top["a"]["calls"] == 2 and top["a"]["ms"] == pytest.approx(0.02)
