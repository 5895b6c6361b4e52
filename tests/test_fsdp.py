"""FSDP2 (training.parallel=fsdp2) for real on the CPU: torch's fully_shard over two gloo
processes makes the update of one unsharded process, checkpoints shard by shard, resumes
bit-exactly after SIGKILL and leaves a consolidated student that plain transformers loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT
from test_data_parallel import TORCHRUN, _run, free_port, largest_difference, two_processes

from poweropd.errors import ConfigError

pytestmark = pytest.mark.e2e

FSDP2 = ["training.parallel=fsdp2"]


@pytest.mark.parametrize(
    "reward, extra",
    [
        ("vanilla", []),  # a sampled-token reward
        ("zscore", ["training.gradient_checkpointing=true"]),  # moments from a no-grad pass; recomputed layers
        ("full_vocab", []),  # the teacher's lm-head gathered from its shards into the student's kernel
        ("power", ["training.fsdp.shard_teacher=false", "training.fsdp.cpu_offload=true"]),
    ],
)
def test_fsdp2_on_two_processes_makes_the_update_of_one_unsharded_process(tmp_path, toy_cache, reward, extra):
    # two micro-batches per process: sharded gradients accumulate over reduce-scatters
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", f"reward={reward}"]
    overrides.append("training.micro_batch_size=2")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, "tests/dp_update_check.py", str(one), *overrides])  # plain, unsharded
    two_processes(two, [*overrides, *FSDP2, *extra])
    a, b = torch.load(one), torch.load(two)
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["metrics"]["n_tokens"] == b["metrics"]["n_tokens"] > 0
    assert set(a["params"]) == set(b["params"])  # the gathered state dict names every weight
    worst = largest_difference(a, b)
    assert worst < 1e-5, worst
    assert a["metrics"]["grad_norm"] > 0 and b["metrics"]["grad_norm"] == pytest.approx(a["metrics"]["grad_norm"], 1e-4)
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-4, abs=1e-7)


def test_fsdp2_bf16_keeps_fp32_master_weights_and_follows_the_fp32_update(tmp_path, toy_cache):
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", "reward=vanilla"]
    fp32, bf16 = tmp_path / "fp32.pt", tmp_path / "bf16.pt"
    two_processes(fp32, [*overrides, *FSDP2])
    two_processes(bf16, [*overrides, *FSDP2, "training.mixed_precision=bf16"])
    a, b = torch.load(fp32), torch.load(bf16)
    assert all(v.dtype == torch.float32 for v in b["params"].values())  # master weights stay fp32
    # bf16 compute moves the numbers, not the update: the same tokens, a close norm and loss
    assert a["metrics"]["n_tokens"] == b["metrics"]["n_tokens"]
    assert b["metrics"]["grad_norm"] == pytest.approx(a["metrics"]["grad_norm"], rel=0.05)
    assert 0 < largest_difference(a, b) < 10 * 1e-4  # a different rounding, an update of the lr's size


def _launch(run_dir, overrides: list[str]) -> subprocess.Popen:
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), "run.py", *overrides]
    cmd.append(f"hydra.run.dir={run_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # its own session, so that SIGKILL reaches the launcher and both workers at once
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


UPDATE_KEYS = ("loss", "grad_norm", "n_tokens", "response_length", "log_ratio/mean", "val/accuracy")


@pytest.mark.parametrize("parallel", ["fsdp2", "ddp"])
def test_two_processes_resume_bit_exactly_after_sigkill_and_leave_a_loadable_student(tmp_path, toy_cache, parallel):
    """Under fsdp2 and under ddp (whose checkpoints keep the student once too: every process
    loads it from the save_pretrained folder, beside accelerate's optimizer and RNG state)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", "reward=power"]
    overrides.append(f"training.parallel={parallel}")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _launch(straight, overrides)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]

    proc = _launch(killed, overrides)
    deadline = time.time() + 300
    while not ((killed / "checkpoints" / "latest").exists() and len(_metrics_lines(killed)) >= 4):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the run ended before it could be killed:\n" + proc.stdout.read()[-3000:])
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    checkpoint = killed / "checkpoints" / "step_000002"
    optimizer = "optimizer_dcp" if parallel == "fsdp2" else "optimizer.bin"
    assert sorted(p.name for p in (checkpoint / "state").iterdir()) == [
        optimizer,
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    if parallel == "fsdp2":
        assert len(list((checkpoint / "state" / "optimizer_dcp").glob("*.distcp"))) == 2  # a shard file per process

    proc = _launch(killed, overrides)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from_step"] == 2 and summary["processes"] == 2
    a, b = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for name in ("reward_dump.npz", "positions.jsonl", "samples.jsonl"):  # written by the main process
        assert (straight / name).stat().st_size > 0, name
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in UPDATE_KEYS} == {k: rb.get(k) for k in UPDATE_KEYS}, ra["step"]

    # The consolidated student: plain transformers loads it, and it is the same model either way.
    weights_a = load_file(str(straight / "student" / "model.safetensors"))
    weights_b = load_file(str(killed / "student" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    for folder in (killed / "student", checkpoint):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(killed / "student").state_dict()
    assert all(torch.equal(loaded[k], weights_b[k]) for k in weights_b)


def _metrics_lines(run_dir) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_fp16_under_fsdp2_is_refused_in_one_line():
    from poweropd.config import TrainingConfig

    with pytest.raises(ConfigError, match="fp16 under training.parallel=fsdp2") as info:
        TrainingConfig(parallel="fsdp2", mixed_precision="fp16")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="training.parallel='zero3' is not valid; choose one of: ddp, fsdp2"):
        TrainingConfig(parallel="zero3")


@pytest.mark.vllm
def test_vllm_rollouts_under_fsdp2_use_one_external_launcher_engine_per_process(tmp_path, toy_cache):
    pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", *FSDP2]
    overrides += ["training.steps=2", "training.save_every=0", "training.rollout_engine=vllm"]
    overrides += ["training.vllm.kv_cache_gib=0.25"]
    proc = _launch(run_dir, overrides)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert out.count("vllm engine (external_launcher executor) synced") == 2  # one engine on each process
    for row in _metrics(run_dir)[1:]:
        # each engine was given the gathered student after every update: the gap is rounding only
        assert row["engine/logprob_gap_max"] < 1e-3 and row["engine/sync_s"] >= 0


def test_a_job_with_two_tasks_is_one_two_process_fsdp2_run(tmp_path, toy_cache):
    """What hydra/launcher=slurm_multinode does on a cluster, with submitit's local executor:
    one job, two tasks, no torchrun; the tasks find each other from the job's environment."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"]
    cmd += [f"hydra.sweep.dir={sweep}", *MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", *FSDP2]
    cmd += ["training.steps=2", "training.save_every=0", "training.cpu_threads=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = list(sweep.rglob("summary.json"))
    assert len(summaries) == 1  # both tasks wrote one run directory
    summary = json.loads(summaries[0].read_text())
    assert summary["status"] == "finished" and summary["processes"] == 2 and summary["steps"] == 2
    logs = "".join(p.read_text() for p in [*sweep.rglob("*_log.err"), *sweep.rglob("run.log")])
    assert "job task 0 of 2" in logs and "job task 1 of 2" in logs


def test_the_multinode_slurm_launcher_starts_one_task_per_gpu_on_each_node(monkeypatch):
    from conftest import CONF_DIR
    from test_sweeps import compose_from

    monkeypatch.chdir(ROOT)
    launcher = compose_from(CONF_DIR, "config", ["hydra/launcher=slurm_multinode"]).hydra.launcher
    assert launcher.nodes == 2 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeued, resumed from a checkpoint
    assert launcher._target_.endswith("SlurmLauncher")


# ----------------------------------------------------------------------------------------
# GPU-only (python -m pytest -m gpu): NCCL, bf16 memory, one vLLM engine per GPU. Not run on
# this project's CPU machines; they skip with a reason where the GPUs are missing.


def _gpus(n: int):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices")


EXACT_GPU = ["training.mixed_precision=no", "model_pair.teacher_dtype=float32"]  # fp32 everywhere: comparable


@pytest.mark.gpu
@_gpus(2)
def test_fsdp2_over_nccl_makes_the_update_of_one_gpu(tmp_path, toy_cache):
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", "reward=power", *EXACT_GPU]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, "tests/dp_update_check.py", str(one), *overrides])
    two_processes(two, [*overrides, *FSDP2])
    a, b = torch.load(one), torch.load(two)
    assert a["metrics"]["n_tokens"] == b["metrics"]["n_tokens"] > 0
    assert largest_difference(a, b) < 1e-4


@pytest.mark.gpu
@_gpus(1)
def test_fsdp2_bf16_on_one_gpu_keeps_fp32_master_weights(tmp_path, toy_cache):
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", *FSDP2]
    out = tmp_path / "bf16.pt"
    _run([sys.executable, "tests/dp_update_check.py", str(out), *overrides, "training.mixed_precision=bf16"])
    result = torch.load(out)
    assert result["metrics"]["grad_norm"] > 0
    assert all(v.dtype == torch.float32 for v in result["params"].values())


@pytest.mark.gpu
@pytest.mark.vllm
@_gpus(2)
def test_vllm_under_fsdp2_on_two_gpus_runs_one_engine_per_gpu(tmp_path, toy_cache):
    pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    overrides = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", *FSDP2, *EXACT_GPU]
    overrides += ["training.steps=2", "training.save_every=0", "training.rollout_engine=vllm"]
    overrides += ["training.vllm.gpu_memory_utilization=0.2"]
    proc = _launch(run_dir, overrides)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    assert out.count("vllm engine (external_launcher executor) synced") == 2
    assert all(row["engine/logprob_gap_max"] < 1e-2 for row in _metrics(run_dir)[1:])


def test_an_in_process_vllm_teacher_under_several_processes_is_refused_in_one_line(tmp_path, toy_cache):
    """Each process would build its own engine inside a barrier the others wait at (it hung
    when tried): refused before any model loads, naming the served teacher instead."""
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), "run.py", *MICRO_PAIR, *MICRO_TRAINING]
    cmd += [f"model_pair.cache_dir={toy_cache}", "model_pair.teacher_backend=vllm", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = {line for line in done.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "teacher_backend=server" in errors.pop()  # the same line from both processes
    assert not (tmp_path / "run").exists()
