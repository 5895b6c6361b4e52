"""Data parallel for real on the CPU: two processes (torchrun, gloo) share one run directory
and one metrics file, and make the same update as one process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT

pytestmark = pytest.mark.e2e  # whole runs and multi-process launches (python -m pytest --fast leaves them out)

TORCHRUN = shutil.which("torchrun") or ""


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.skipif(not TORCHRUN, reason="torchrun is installed with torch; missing here")
def test_two_cpu_processes_share_one_run_directory(tmp_path, toy_cache):
    run_dir = tmp_path / "runs" / "dp"
    _run(
        [
            TORCHRUN,
            "--nproc_per_node",
            "2",
            "run.py",
            *MICRO_PAIR,
            *MICRO_TRAINING,
            "training.steps=2",
            f"model_pair.cache_dir={toy_cache}",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["dp"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["processes"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # one metrics file, written once per step
    assert not list(run_dir.glob("metrics*.jsonl.*"))


@pytest.mark.skipif(not TORCHRUN, reason="torchrun is installed with torch; missing here")
@pytest.mark.parametrize("reward", ["vanilla", "zscore", "full_vocab"])
def test_two_processes_make_the_update_of_one(tmp_path, toy_cache, reward):
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", f"reward={reward}"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, "tests/dp_update_check.py", str(one), *overrides])
    _run([TORCHRUN, "--nproc_per_node", "2", "tests/dp_update_check.py", str(two), *overrides])
    a, b = torch.load(one), torch.load(two)
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["metrics"]["n_tokens"] == b["metrics"]["n_tokens"] > 0  # the same global batch
    worst = max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])
    assert worst < 1e-5, worst
    # The update did something (a test of equality between two no-ops would pass vacuously).
    assert a["metrics"]["grad_norm"] > 0 and b["metrics"]["grad_norm"] == pytest.approx(a["metrics"]["grad_norm"], 1e-4)
