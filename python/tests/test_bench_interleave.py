"""`bench interleave`: several builds of one config timed in turns, in one process.

Runs on CPU builds of a tiny Llama (the GPU numbers live in docs/performance.md); what is checked
here is the bookkeeping: every scheme timed once per round, the ratios are those of the samples
kept, and bad input is refused with an error that says what to pass.
"""
import statistics

import pytest

from mlc_quant import bench


@pytest.fixture(scope="module")
def tiny_builds(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_builds")
    cfg = bench.bench_config(tiny_llama_dir)
    for scheme in ("q0f16", "smq_q8i8f16_0"):
        bench.build_one(cfg, scheme, root / "tiny" / scheme, target="llvm")
    return root


@pytest.mark.parametrize("order", ["turns", "blocks"])
def test_interleaved_samples_and_ratios(tiny_builds, order):
    out = bench.run_interleaved(tiny_builds, "tiny", lengths=(8, 16), decode_tokens=3, rounds=4, warmup=1,
                                order=order, warmup_s=0.05 if order == "blocks" else 0.0)
    assert out["order"] == order
    assert set(out["schemes"]) == {"q0f16", "smq_q8i8f16_0"}
    keys = ["prefill_8", "prefill_16", "decode"]
    for s, cells in out["schemes"].items():
        assert list(cells) == keys, s
        for k, c in cells.items():
            assert len(c["ms_samples"]) == 4 and len(c["issue_ms_samples"]) == 4
            assert all(i <= w + 1e-3 for i, w in zip(c["issue_ms_samples"], c["ms_samples"]))
            assert c["ms_min"] <= c["ms_median"] <= c["ms_max"]
            assert c["ms_median"] == pytest.approx(statistics.median(c["ms_samples"]), abs=2e-3)
            work = 3 if k == "decode" else int(k.split("_")[1])
            assert c["tokens_per_s"] == pytest.approx(work / (c["ms_median"] / 1e3), rel=1e-2)
    r = out["ratios"]["smq_q8i8f16_0"]
    for k in keys:
        base = out["schemes"]["q0f16"][k]["ms_samples"]
        other = out["schemes"]["smq_q8i8f16_0"][k]["ms_samples"]
        assert r[k]["of_medians"] == pytest.approx(statistics.median(base) / statistics.median(other), rel=2e-2)
        paired = sorted(b / o for b, o in zip(base, other))
        assert r[k]["paired_min"] == pytest.approx(paired[0], rel=2e-2)
        assert r[k]["paired_max"] == pytest.approx(paired[-1], rel=2e-2)
        assert r[k]["paired_min"] <= r[k]["paired_median"] <= r[k]["paired_max"]
    text = bench.format_interleaved(out)
    assert "smq_q8i8f16_0" in text and "prefill_16" in text
    spans = out["block_spans"]
    if order == "turns":
        assert spans == []
        return
    # one span per (case, scheme), in the order run, for lining up with an nvidia-smi log
    assert [(b["case"], b["scheme"]) for b in spans] == [(k, s) for k in keys for s in out["schemes"]]
    for b, nxt in zip(spans, spans[1:] + [None]):
        assert b["warm_start"] <= b["samples_start"] <= b["end"]
        assert nxt is None or b["end"] <= nxt["warm_start"]
        assert b["joules_per_call"] is None  # no NVML for a CPU build
    # the plot takes it in bench run's shape
    runs = bench._interleave_as_runs(out)["runs"]  # pylint: disable=protected-access
    assert {r["scheme"] for r in runs} == set(out["schemes"])
    q = next(r for r in runs if r["scheme"] == "q0f16")
    assert q["prefill"]["16"]["tokens_per_s"] == out["schemes"]["q0f16"]["prefill_16"]["tokens_per_s"]
    assert q["decode"]["tokens_per_s"] == out["schemes"]["q0f16"]["decode"]["tokens_per_s"]


def test_interleaved_refuses_bad_input(tiny_builds):
    with pytest.raises(FileNotFoundError, match="--config"):
        bench.run_interleaved(tiny_builds, "no-such-config")
    with pytest.raises(ValueError, match="needs q0f16"):
        bench.run_interleaved(tiny_builds, "tiny", schemes=["smq_q8i8f16_0"])
    with pytest.raises(ValueError, match="order must be"):
        bench.run_interleaved(tiny_builds, "tiny", order="random")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.run_interleaved(tiny_builds, "tiny", rounds=0)


def test_run_ours_keeps_every_prefill_sample(tiny_builds):
    """`bench run` on a CPU build: each prefill length reports its median and the samples behind it."""
    r = bench.run_ours(tiny_builds / "tiny" / "smq_q8i8f16_0", lengths=(8, 16), decode_tokens=3, warmup=1,
                       repeat=3, profile=False)
    for n in ("8", "16"):
        p = r["prefill"][n]
        assert len(p["ms_samples"]) == 3
        assert p["ms"] == pytest.approx(statistics.median(p["ms_samples"]), abs=2e-3)
        assert p["tokens_per_s"] == pytest.approx(int(n) / (p["ms"] / 1e3), rel=1e-2)
    assert r["logits_finite"] and r["decode"]["tokens_per_s"] > 0
