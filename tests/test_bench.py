"""The benchmark scripts run and report what they measured (their numbers are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

from poweropd.bench import logprobs_table


def test_logprobs_benchmark_runs_small_and_writes_json(tmp_path):
    out = tmp_path / "lp.json"
    cmd = [sys.executable, "-m", "poweropd.bench", "logprobs", "--tokens", "64", "--vocab", "500", "--hidden", "8"]
    done = subprocess.run(
        [*cmd, "--chunk", "16", "--repeats", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    kinds = {(r["kind"], r["tokens"]) for r in result["rows"]}
    assert kinds == {("naive", 64), ("chunked", 64)}
    assert all(r["time_s"] > 0 for r in result["rows"])
    assert result["command"].startswith("python -m poweropd.bench logprobs") and result["machine"]["torch"]


def test_skipped_cases_are_said_not_hidden():
    rows = [
        {"kind": "naive", "tokens": 65536, "skipped": "needs ~111 GB"},
        {"kind": "chunked", "tokens": 65536, "time_s": 2.0, "peak_mem_gb": 1.2},
        {"kind": "naive", "tokens": 1024, "time_s": 1.0, "peak_mem_gb": 2.0},
        {"kind": "chunked", "tokens": 1024, "time_s": 1.1, "peak_mem_gb": 0.5},
    ]
    table = logprobs_table(rows)
    assert "| 1024 | 1.000 | 1.100 | 1.10x | 2.00 | 0.50 | 4.0x lower |" in table
    assert "skipped (needs ~111 GB)" in table
