"""End-to-end runs of run.py on the micro toy pair: the run-directory contract,
kill-and-resume, W&B mirroring and the toy pair's determinism."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT, kill_after_checkpoint

pytestmark = pytest.mark.e2e  # whole runs and multi-process launches (python -m pytest --fast leaves them out)

STEP_KEYS = {
    "loss",
    "grad_norm",
    "lr",
    "step_time",
    "tokens_per_s",
    "response_length",
    "truncation_rate",
    "n_tokens",
    *(f"{p}/{s}" for p in ("reward", "log_ratio") for s in ("mean", "std", "min", "max", "p5", "p95")),
}


def run_py(run_dir: Path, toy_cache: Path, *extra: str, wait: bool = True, timeout: int = 300):
    cmd = [
        sys.executable,
        "run.py",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        f"model_pair.cache_dir={toy_cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contract(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    run_py(run_dir, toy_cache, "reward=power", "reward.alpha=3")
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "run_config.json",
        "metrics.jsonl",
        "positions.jsonl",
        "reward_dump.npz",
        "reward_dump_rollouts.jsonl",
        "samples.jsonl",
        "summary.json",
        "student/config.json",
        "student/model.safetensors",
        "student/tokenizer.json",
        "checkpoints/latest",
    ):
        assert (run_dir / name).exists(), name

    rows = metrics_of(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "val/accuracy" in rows[0] and "dump/log_ratio/min" in rows[0]  # before any update
    for row in rows[1:]:
        assert STEP_KEYS <= set(row), STEP_KEYS - set(row)
        assert -1.0 <= row["reward/min"] <= row["reward/max"] <= 1.0  # PowerOPD is bounded
        assert row["lr"] == pytest.approx(1e-4)
    assert all("val/accuracy" in rows[s] for s in (2, 4)) and "val/accuracy" not in rows[1]

    positions = [json.loads(line) for line in (run_dir / "positions.jsonl").read_text().splitlines()]
    assert [p["step"] for p in positions] == [2, 4]
    for p in positions:
        assert len(p["position"]) == len(p["count"]) == len(p["reward_mean"]) == len(p["log_ratio_max"])
        assert sum(p["count"]) == rows[p["step"]]["n_tokens"]

    dump = np.load(run_dir / "reward_dump.npz")
    assert {"rollout", "position", "teacher_logprob", "student_logprob", "log_ratio", "reward"} <= set(dump.files)
    np.testing.assert_allclose(dump["log_ratio"], dump["teacher_logprob"] - dump["student_logprob"], atol=1e-6)
    np.testing.assert_allclose(
        dump["reward"], np.exp(3 * dump["teacher_logprob"]) - np.exp(3 * dump["student_logprob"]), atol=1e-6
    )
    assert len(dump["log_ratio"]) == rows[0]["dump/n_tokens"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["method"] == "PowerOPD α=3"
    assert summary["metrics_lines"] == 5 and summary["median_step_time"] > 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    assert model.config.vocab_size == len(tok)

    # a second launch of a finished run does nothing and rewrites nothing
    before = (run_dir / "metrics.jsonl").read_text()
    run_py(run_dir, toy_cache, "reward=power", "reward.alpha=3")
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_kill_and_resume_gives_one_line_per_step(tmp_path, toy_cache):
    args = ("training.steps=8", "training.save_every=2", "reward=vanilla")
    reference = tmp_path / "uninterrupted"
    run_py(reference, toy_cache, *args)

    run_dir = tmp_path / "killed"
    kill_after_checkpoint(run_py(run_dir, toy_cache, *args, wait=False), run_dir)
    assert not (run_dir / "summary.json").exists()

    run_py(run_dir, toy_cache, *args)
    rows, expected = metrics_of(run_dir), metrics_of(reference)
    assert [r["step"] for r in rows] == list(range(9))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] in (2, 4, 6)
    # The resumed run restores model, optimizer, RNG and data position: same numbers.
    for got, want in zip(rows, expected):
        for key in ("loss", "grad_norm", "n_tokens", "log_ratio/mean"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)


def test_resume_refuses_a_different_config(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    proc = run_py(run_dir, toy_cache, "training.steps=3", "training.save_every=1", "reward=power", wait=False)
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    original = (run_dir / ".hydra" / "overrides.yaml").read_text()
    cmd = [
        sys.executable,
        "run.py",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        f"model_pair.cache_dir={toy_cache}",
        f"hydra.run.dir={run_dir}",
        "training.steps=3",
        "training.save_every=1",
        "reward=power",
        "reward.alpha=50",
    ]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "reward.alpha: 5.0 -> 50.0" in bad.stderr and "\n" not in bad.stderr.strip()
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == original  # nothing already written is lost


def test_a_finished_run_is_done_only_for_its_own_config(tmp_path, toy_cache):
    """Re-launching a finished run's command is a no-op; launching another config into its
    directory (a sweep whose job numbers moved) is refused in one line, not taken as done."""
    run_dir = tmp_path / "run"
    run_py(run_dir, toy_cache, "training.steps=2", "training.save_every=0", "reward=power")
    metrics = (run_dir / "metrics.jsonl").read_text()
    again = run_py(run_dir, toy_cache, "training.steps=2", "training.save_every=0", "reward=power")
    assert "already holds an ended run" in again.stdout + again.stderr
    cmd = [sys.executable, "run.py", *MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}"]
    cmd += [f"hydra.run.dir={run_dir}", "training.steps=2", "training.save_every=0", "reward=power", "reward.alpha=50"]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "reward.alpha: 5.0 -> 50.0" in bad.stderr
    assert "\n" not in bad.stderr.strip()
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # the finished run is untouched


def test_wandb_mirror_offline(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    run_py(run_dir, toy_cache, "logger=wandb", "logger.mode=offline", "training.steps=2", "training.save_every=0")
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "summary.json").exists()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_toy_pair_build_is_deterministic(tmp_path):
    from conftest import tiny_toy_spec

    from poweropd.toy.build import ensure_toy_pair
    from poweropd.toy.spec import ToyPairSpec

    spec = tiny_toy_spec()
    a, b = ensure_toy_pair(spec, tmp_path / "a"), ensure_toy_pair(spec, tmp_path / "b")
    assert a.name == b.name  # same spec, same cache key
    from safetensors.torch import load_file

    for role in ("teacher", "student"):
        wa, wb = load_file(a / role / "model.safetensors"), load_file(b / role / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    other = ensure_toy_pair(ToyPairSpec(**{**spec.__dict__, "seed": 1}), tmp_path / "a")
    assert other != a
    w_other = load_file(other / "student" / "model.safetensors")
    assert not all(torch.equal(w_other[k], wa[k]) for k in wa)


def test_data_parallel_with_two_processes(tmp_path, toy_cache):
    """Two CPU processes (gloo) started by torchrun, the launcher `accelerate launch` uses
    for multi-GPU runs: one shared run directory, one metrics line per step, statistics
    over both processes' tokens."""
    run_dir = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        "run.py",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        f"model_pair.cache_dir={toy_cache}",
        f"hydra.run.dir={run_dir}",
        "training.steps=3",
        "reward=full_vocab",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics_of(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2
    for row in rows[1:]:
        assert row["kl/min"] >= -1e-6 and row["n_tokens"] > 0
        # statistics are gathered over both processes' tokens
        assert row["n_generated"] >= row["n_tokens"]


def test_same_numbers_whether_or_not_the_pair_was_cached(tmp_path):
    """The first run builds the pair (drawing random numbers of its own); the second finds
    it cached. Same seed, same metrics."""
    cache = tmp_path / "fresh_cache"
    first, second = tmp_path / "first", tmp_path / "second"
    run_py(first, cache, "training.steps=2", "training.save_every=0")
    run_py(second, cache, "training.steps=2", "training.save_every=0")
    for a, b in zip(metrics_of(first), metrics_of(second)):
        for key in ("loss", "grad_norm", "val/accuracy", "dump/log_ratio/mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_paper_preset_trains_on_deepscaler_and_validates_on_math500(tmp_path, micro_pair):
    """training=paper on a local hf pair: DeepScaleR-format prompts for training, a seeded
    subset of MATH-500 (through the benchmark registry) for validation and the reward dump."""
    import shutil

    from poweropd.toy.task import make_problems

    _, pair = micro_pair
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(pair.teacher_path, teacher)
    shutil.copytree(pair.student_path, student)
    data = tmp_path / "data"
    data.mkdir()
    for name, n, split in (("deepscaler_train", 40, "train"), ("math500", 500, "test")):
        with (data / f"{name}.jsonl").open("w") as handle:
            for i, row in enumerate(make_problems(split, n)):
                handle.write(json.dumps({**row, "id": f"{name}-{i}"}) + "\n")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "run.py",
        "model_pair=custom",
        f"model_pair.teacher={teacher}",
        f"model_pair.student={student}",
        "training=paper",
        f"training.data_dir={data}",
        "training.steps=2",
        "training.batch_size=4",
        "training.micro_batch_size=2",
        "training.gen_batch_size=4",
        "training.max_new_tokens=8",
        "training.val_every=1",
        "training.val_size=5",
        "training.val_max_new_tokens=8",
        "training.reward_dump_prompts=3",
        "training.save_every=0",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = metrics_of(run_dir)
    assert [m["step"] for m in lines] == [0, 1, 2] and all("val/accuracy" in m for m in lines)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    val_ids = {s["id"] for s in samples}
    assert val_ids and all(i.startswith("math500-") for i in val_ids)
    assert val_ids != {f"math500-{i}" for i in range(len(val_ids))}  # a random subset, not the first rows
    dumped = [json.loads(line)["id"] for line in (run_dir / "reward_dump_rollouts.jsonl").read_text().splitlines()]
    assert len(dumped) == 3 and all(i.startswith("math500-") for i in dumped)


TIMING_KEYS = ("step_time", "tokens_per_s", "time/", "mem/", "engine/sync_s", "teacher/seconds", "teacher/tokens_per_s")


def test_same_seed_on_the_shipped_pair_gives_bit_identical_metrics(tmp_path):
    """The default toy pair (shipped, nothing built), the same command twice: every logged
    number but the timings is bitwise equal, step by step; another seed differs."""
    short = [
        "training.steps=3",
        "training.batch_size=8",
        "training.val_size=16",
        "training.val_every=3",
        "training.reward_dump_prompts=4",
        "training.save_every=0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "POWEROPD_CACHE": str(tmp_path / "cache")}
    dirs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        dirs[name] = tmp_path / name
        cmd = [sys.executable, "run.py", *short, f"seed={seed}", f"hydra.run.dir={dirs[name]}"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # the shipped pair: nothing built or cached

    def numbers(run_dir):
        return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in metrics_of(run_dir)]

    a, b, c = numbers(dirs["a"]), numbers(dirs["b"]), numbers(dirs["c"])
    assert len(a) == 4 and a == b  # == on floats: bitwise
    assert {"entropy/mean", "reward/frac_above_0.01"} <= set(a[1])
    assert a[1]["loss"] != c[1]["loss"]
    dump_a, dump_b = np.load(dirs["a"] / "reward_dump.npz"), np.load(dirs["b"] / "reward_dump.npz")
    assert all(np.array_equal(dump_a[k], dump_b[k]) for k in dump_a.files)
