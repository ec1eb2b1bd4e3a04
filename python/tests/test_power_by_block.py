"""scripts/power_by_block.py: an nvidia-smi log lined up with bench interleave's blocks."""
import datetime as dt
import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "power_by_block.py"


@pytest.fixture(scope="module")
def pbb():
    spec = importlib.util.spec_from_file_location("power_by_block", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _line(t, mhz, watts, reasons):
    stamp = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    return f"{stamp}, {mhz}, {watts}, {reasons}\n"


def test_blocks_get_their_own_log_lines(pbb, tmp_path, capsys):
    t0 = 1_800_000_000.0
    # block A: 1.0-2.0 s capped at 1400 MHz; block B: 3.0-4.0 s free at 1980 MHz; a cut-off last line
    lines = [_line(t0 + 0.5, 1980, 300.0, "0x0000000000000000")]
    lines += [_line(t0 + 1.0 + i / 10, 1400 + i, 690.0 + i, "0x0000000000000004") for i in range(10)]
    lines += [_line(t0 + 3.0 + i / 10, 1980, 500.0, "0x0000000000000000") for i in range(10)]
    log = tmp_path / "smi.csv"
    log.write_text("".join(lines) + "2026/11/27 21:00:0")
    spans = [{"scheme": "q0f16", "case": "prefill_512", "warm_start": t0, "samples_start": t0 + 1.0,
              "end": t0 + 1.95, "joules_per_call": 9.5},
             {"scheme": "smq", "case": "prefill_512", "warm_start": t0 + 2.0, "samples_start": t0 + 3.0,
              "end": t0 + 3.95, "joules_per_call": None}]
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"block_spans": spans}))
    assert pbb.main([str(log), str(bench_json), "--json", str(tmp_path / "t.json")]) == 0
    a, b = json.loads((tmp_path / "t.json").read_text())
    assert a["log_lines"] == 10 and a["sm_mhz_min"] == 1400 and a["sm_mhz_median"] == pytest.approx(1404.5)
    assert a["power_w_max"] == 699.0 and a["power_capped_share"] == 1.0 and a["joules_per_call"] == 9.5
    assert b["log_lines"] == 10 and b["sm_mhz_median"] == 1980 and b["power_capped_share"] == 0.0
    assert "prefill_512" in capsys.readouterr().out


def test_refuses_a_json_without_blocks(pbb, tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"schemes": {}}))
    (tmp_path / "smi.csv").write_text("")
    assert pbb.main([str(tmp_path / "smi.csv"), str(tmp_path / "b.json")]) == 2
