"""Data parallel for real on the CPU: two processes (torchrun, gloo) share one run directory
and one metrics file, and make the same update as one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT

pytestmark = pytest.mark.e2e  # whole runs and multi-process launches (python -m pytest --fast leaves them out)

# torch's launcher through this interpreter: it never depends on `torchrun` being on PATH
# (a venv that is not activated), so these tests never skip.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def two_processes(out, overrides: list[str]) -> None:
    """tests/dp_update_check.py under two processes on one node."""
    _run(
        [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            "tests/dp_update_check.py",
            str(out),
            *overrides,
        ]
    )


def largest_difference(a: dict, b: dict) -> float:
    return max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_cpu_processes_share_one_run_directory(tmp_path, toy_cache):
    run_dir = tmp_path / "runs" / "dp"
    _run(
        [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
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


@pytest.mark.parametrize("reward", ["vanilla", "zscore", "full_vocab"])
def test_two_processes_make_the_update_of_one(tmp_path, toy_cache, reward):
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", f"reward={reward}"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, "tests/dp_update_check.py", str(one), *overrides])
    two_processes(two, overrides)
    a, b = torch.load(one), torch.load(two)
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["metrics"]["n_tokens"] == b["metrics"]["n_tokens"] > 0  # the same global batch
    worst = largest_difference(a, b)
    assert worst < 1e-5, worst
    # The update did something (a test of equality between two no-ops would pass vacuously).
    assert a["metrics"]["grad_norm"] > 0 and b["metrics"]["grad_norm"] == pytest.approx(a["metrics"]["grad_norm"], 1e-4)


def test_two_nodes_on_localhost_make_the_update_of_two_processes(tmp_path, toy_cache):
    """Multi-node as torchrun runs it: two invocations (one per "node", one process each)
    with a static rendezvous on 127.0.0.1 make the update of one 2-process node."""
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", "reward=power"]
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    two_processes(single, overrides)
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "tests/dp_update_check.py",
                str(multi),
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    a, b = torch.load(single), torch.load(multi)
    assert (a["processes"], b["processes"]) == (2, 2) and a["metrics"]["n_tokens"] == b["metrics"]["n_tokens"] > 0
    worst = largest_difference(a, b)
    assert worst < 1e-6, worst


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_that_accelerate_would_ignore_on_a_cpu_is_refused(tmp_path, toy_cache, variable):
    env = {**os.environ, variable: "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "run.py",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        f"model_pair.cache_dir={toy_cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{variable} is set" in errors[0] and "plain data parallel" in errors[0]
    assert not (tmp_path / "run").exists()  # a refused launch leaves no run directory
