"""Lose nothing, say what happened in one line: preemption signals, corrupt checkpoints and
files, two runs in one folder, unbounded input, half-written evaluations and caches."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT, make_config

from poweropd.checkpoint import _prune, checkpoint_in_use, step_checkpoints
from poweropd.errors import ConfigError
from poweropd.files import DiskFull, FileProblem, read_json_object, write_text_atomic
from poweropd.tracking import RunLock

STEPS = 6


def micro_cfg(toy_cache, *extra):
    return make_config(
        MICRO_PAIR
        + MICRO_TRAINING
        + [f"model_pair.cache_dir={toy_cache}", f"training.steps={STEPS}", "training.keep_checkpoints=2", *extra]
    )


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, toy_cache):
    """A micro run as a kill after step 5 leaves it: checkpoints step 2 and 4 (keep 2), metrics
    up to step 5, no summary and no final student."""
    from poweropd.train import train

    run_dir = tmp_path_factory.mktemp("killed") / "run"
    train(micro_cfg(toy_cache), run_dir)
    shutil.rmtree(run_dir / "student")
    (run_dir / "summary.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir.parent / "uninterrupted.jsonl").write_text("".join(lines))
    (run_dir / "metrics.jsonl").write_text("".join(lines[:6]))  # steps 0..5
    assert [p.name for p in step_checkpoints(run_dir)] == ["step_000004", "step_000002"]
    return run_dir


def resume(killed_run, tmp_path, toy_cache, *extra):
    from poweropd.train import train

    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    return run_dir, (lambda: train(micro_cfg(toy_cache, *extra), run_dir))


# ----------------------------------------------------------------------------------------
# 1. Signals: the update in flight finishes, is checkpointed, and the signal is handed on


def test_graceful_stop_waits_for_the_update_and_chains_the_previous_handler():
    from poweropd.train import GracefulStop

    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert stop.signum == signal.SIGUSR2 and seen == []  # noted, not acted on mid-update

            class OneProcess:
                num_processes = 1

            assert stop.requested(OneProcess())
            with pytest.raises(SystemExit) as exited:
                stop.hand_over()
        assert seen == [signal.SIGUSR2]  # e.g. submitit's requeue ran, after our checkpoint
        assert exited.value.code == 128 + signal.SIGUSR2
        assert signal.getsignal(signal.SIGUSR2) is not stop._handle  # handlers put back
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])  # USR1/2: above
def test_a_signal_mid_run_checkpoints_the_current_step_and_the_rerun_finishes(tmp_path, toy_cache, signum):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "run.py",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        f"model_pair.cache_dir={toy_cache}",
        f"hydra.run.dir={run_dir}",
        "training.steps=20",
        "training.save_every=0",  # no periodic checkpoint: only the signal makes one
        "training.val_every=0",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 4
    ):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 128 + signum, out[-3000:]
    logged = steps_logged(run_dir)
    assert [p.name for p in step_checkpoints(run_dir)] == [f"step_{logged[-1]:06d}"]  # the step in flight
    assert not (run_dir / "summary.json").exists() and f"stopped by {signal.Signals(signum).name}" in out
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert steps_logged(run_dir) == list(range(21))
    summary = read_json_object(run_dir / "summary.json")
    assert summary["status"] == "finished" and summary["resumed_from_step"] == logged[-1]


# ----------------------------------------------------------------------------------------
# 2-4. Resume picks the newest checkpoint that verifies, or refuses


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "deleted student weights": lambda ck: (ck / "model.safetensors").unlink(),
    "zeroed student weights": lambda ck: (ck / "model.safetensors").write_bytes(b"\0" * 4096),
    "empty optimizer": lambda ck: (ck / "state" / "optimizer.bin").write_bytes(b""),
    "truncated optimizer": lambda ck: _truncate(ck / "state" / "optimizer.bin"),
    "garbage trainer state": lambda ck: (ck / "trainer_state.json").write_text("{not json"),
    "truncated top-level weights": lambda ck: _truncate(ck / "model.safetensors"),
}


@pytest.mark.parametrize("layout", ["stored once", "a second copy in state/ (older checkpoints): not read"])
def test_a_checkpoint_stores_the_fp32_student_once_and_resumes_exactly_from_it(killed_run, tmp_path, toy_cache, layout):
    from safetensors import safe_open

    from poweropd.bench.memory import disk_rows

    # the run wrote the checkpoints the disk table counts (steps 2 and 4 of 6; step 6 is student/)
    assert len(step_checkpoints(killed_run)) == disk_rows(save_every=2, steps=STEPS)[0]["checkpoints_written"]
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    ck = run_dir / "checkpoints" / "step_000004"
    assert sorted(p.name for p in (ck / "state").iterdir()) == ["optimizer.bin", "random_states_0.pkl"]
    with safe_open(str(ck / "model.safetensors"), framework="pt") as saved:
        tensors = [saved.get_tensor(k) for k in saved.keys()]
    assert {t.dtype for t in tensors} == {torch.float32}
    params = sum(t.numel() for t in tensors)
    optimizer = (ck / "state" / "optimizer.bin").stat().st_size
    assert 8 * params <= optimizer < 8 * params * 1.02 + 65536  # AdamW's two fp32 moments, and little else
    if layout != "stored once":  # an older checkpoint's copy, here a damaged one: it must not matter
        (ck / "state" / "model.safetensors").write_bytes(b"\0" * 4096)
    summary = go()
    assert summary["resumed_from_step"] == 4
    want = [json.loads(line) for line in (killed_run.parent / "uninterrupted.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got[5:], want[5:]):  # the updates after the resume
        for key in ("loss", "grad_norm", "n_tokens"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(killed_run, tmp_path, toy_cache, caplog, corruption):
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    CORRUPTIONS[corruption](run_dir / "checkpoints" / "step_000004")
    with caplog.at_level(logging.WARNING, logger="poweropd.checkpoint"):
        summary = go()
    assert summary["status"] == "finished" and summary["resumed_from_step"] == 2
    assert steps_logged(run_dir) == list(range(STEPS + 1))
    said = [r.getMessage() for r in caplog.records if "skipped newer checkpoint" in r.getMessage()]
    assert len(said) == 1 and "step_000004" in said[0] and "\n" not in said[0]


def test_no_usable_checkpoint_is_refused_not_restarted(killed_run, tmp_path, toy_cache):
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    for ck in step_checkpoints(run_dir):
        (ck / "state" / "optimizer.bin").write_bytes(b"")
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="holds 2 checkpoint\\(s\\) but none can be resumed from") as err:
        go()
    assert "\n" not in str(err.value) and "step_000004" in str(err.value) and "step_000002" in str(err.value)
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing of the old run was touched


@pytest.mark.parametrize("damage", ["deleted target", "emptied pointer"])
def test_a_broken_latest_pointer_still_resumes_from_the_newest(killed_run, tmp_path, toy_cache, damage):
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    latest = run_dir / "checkpoints" / "latest"
    if damage == "emptied pointer":
        latest.write_text("")
    else:
        latest.write_text("step_000099")
    summary = go()
    assert summary["resumed_from_step"] == 4 and steps_logged(run_dir) == list(range(STEPS + 1))


def test_a_checkpoint_without_rng_state_is_not_resumed_inexactly(killed_run, tmp_path, toy_cache, caplog):
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    (run_dir / "checkpoints" / "step_000004" / "state" / "random_states_0.pkl").unlink()
    with caplog.at_level(logging.WARNING, logger="poweropd.checkpoint"):
        summary = go()
    assert summary["resumed_from_step"] == 2  # the older, exact one
    assert any("random_states_0.pkl" in r.getMessage() for r in caplog.records)


def test_an_inexact_resume_is_refused_unless_allowed(killed_run, tmp_path, toy_cache):
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    (run_dir / "checkpoints" / "step_000004" / "state" / "random_states_0.pkl").unlink()
    with pytest.raises(ConfigError, match="training.allow_inexact_resume=true accepts it"):
        go()
    from poweropd.train import train

    summary = train(micro_cfg(toy_cache, "training.allow_inexact_resume=true"), run_dir)
    assert summary["resumed_from_step"] == 4 and summary["status"] == "finished"


# ----------------------------------------------------------------------------------------
# 5. Lost metrics lines are counted and kept aside


def test_a_metrics_file_cut_mid_line_is_reported_and_the_partial_line_kept(killed_run, tmp_path, toy_cache):
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:40])  # steps 0, 1, then half of 2
    summary = go()
    assert summary["discarded_metrics_lines"] == [3]
    assert summary["missing_metrics_steps"] == [2, 3, 4]  # lost before the checkpoint (step 4): never redone
    assert lines[2][:40] in (run_dir / "metrics.discarded").read_text()


# ----------------------------------------------------------------------------------------
# 6. One run per directory


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    holder = RunLock(run_dir).acquire()
    try:
        with pytest.raises(ConfigError, match=f"is in use by pid {os.getpid()}"):
            RunLock(run_dir).acquire()
        done = subprocess.run(
            [
                sys.executable,
                "run.py",
                *MICRO_PAIR,
                *MICRO_TRAINING,
                f"model_pair.cache_dir={toy_cache}",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and f"pid {os.getpid()}" in lines[0], done.stderr
        assert run_dir.is_dir()  # the holder's directory is not "cleaned up" by the refused launch
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.release()
    RunLock(run_dir).acquire().release()  # free again once the holder lets go


# ----------------------------------------------------------------------------------------
# 7. Every file read back: one line naming it


@pytest.mark.parametrize("name", ["run_config.json", "summary.json"])
def test_garbage_run_files_are_one_line(killed_run, tmp_path, toy_cache, name):
    run_dir, go = resume(killed_run, tmp_path, toy_cache)
    (run_dir / name).write_text('{"status": "fini')
    with pytest.raises(FileProblem) as err:
        go()
    assert str(run_dir / name) in str(err.value) and "not valid JSON" in str(err.value) and "\n" not in str(err.value)


def test_a_non_utf8_byte_in_a_data_file_names_the_line(tmp_path):
    from poweropd.benchmarks import read_jsonl

    path = tmp_path / "deepscaler_train.jsonl"
    path.write_bytes(b'{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "\xff", "answer": "1"}\n')
    with pytest.raises(FileProblem, match=f"{path}:2: not UTF-8 text"):
        read_jsonl(path)


def test_a_full_disk_names_the_write_and_the_intact_checkpoint(killed_run, tmp_path, toy_cache, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    run_dir, go = resume(killed_run, tmp_path, toy_cache, "training.save_every=1")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    with pytest.raises(ConfigError) as err:
        go()
    text = str(err.value)
    assert "writing checkpoint step_000005 failed: no space left on device" in text and "\n" not in text
    assert "step_000004 is intact" in text
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the half-written temporary is gone
    with pytest.raises(DiskFull, match="writing .* failed: no space left on device"):
        monkeypatch.setattr(os, "replace", no_space)
        write_text_atomic(tmp_path / "x.json", "{}")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.json")]


# ----------------------------------------------------------------------------------------
# 8. Unbounded input


def test_an_oversized_training_prompt_is_skipped_without_tokenising_it(micro_pair):
    from poweropd.data import bound_prompts

    tokenizer = micro_pair[1].tokenizer
    calls = []

    def counting(text, **kwargs):
        calls.append(len(text))
        return tokenizer(text, **kwargs)

    rows = [
        {"id": "ok", "problem": "Ann has 3 pens. How many now?"},
        {"id": "huge", "problem": "7" * 10_000_000},
        {"id": "long", "problem": "9" * 300},
    ]
    kept, skipped = bound_prompts(rows, counting, 200)
    assert [r["id"] for r in kept] == ["ok"] and skipped == ["huge", "long"]
    assert calls == [300]  # only the one in the grey zone was tokenised; never the 10 MB line
    with pytest.raises(ConfigError, match="every one of the 1 training prompts is longer"):
        bound_prompts(rows[1:2], counting, 200)


# ----------------------------------------------------------------------------------------
# 9. Evaluation: a result is done only when its samples back it


@pytest.mark.e2e
def test_an_emptied_samples_file_is_not_taken_as_done(tmp_path, toy_cache):
    from poweropd.config import EvaluateConfig, ModelPairConfig
    from poweropd.evaluation import evaluate

    pair = micro_cfg(toy_cache).model_pair
    assert isinstance(pair, ModelPairConfig)
    cfg = EvaluateConfig(model="student", output_root=str(tmp_path), model_pair=pair)
    cfg.eval.n, cfg.eval.limit, cfg.eval.max_new_tokens = 2, 3, 4
    first = evaluate(cfg)
    folder = next(tmp_path.rglob("toy_test.samples.jsonl")).parent
    (folder / "toy_test.samples.jsonl").write_text("")
    again = evaluate(cfg)
    assert len((folder / "toy_test.samples.jsonl").read_text().splitlines()) == 6
    assert (folder / "toy_test.samples.jsonl.corrupt").exists()
    assert again["benchmarks"]["toy_test"]["avg_at_n"] == first["benchmarks"]["toy_test"]["avg_at_n"]
    (folder / "toy_test.json").write_text('{"avg_at')  # a truncated result: redone, kept aside
    evaluate(cfg)
    assert read_json_object(folder / "toy_test.json")["problems"] == 3


# ----------------------------------------------------------------------------------------
# 10. A partial toy cache is replaced atomically


@pytest.mark.e2e
def test_a_partial_toy_cache_folder_is_rebuilt_in_place(tmp_path, micro_pair):
    from poweropd.toy.build import ensure_toy_pair, pair_dir

    spec = micro_pair[0].model_pair.toy
    target = pair_dir(spec, tmp_path)
    (target / "teacher").mkdir(parents=True)  # an interrupted copy: teacher/ only, no build.json
    (target / "teacher" / "config.json").write_text("{}")
    (target.parent / f"{target.name}.tmp-999999").mkdir()  # a dead builder's temporary
    assert ensure_toy_pair(spec, tmp_path) == target
    assert (target / "build.json").is_file() and (target / "student" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f"{target.name}.lock"])


# ----------------------------------------------------------------------------------------
# 11. The analysis survives a broken reward dump


def test_a_truncated_reward_dump_is_a_listed_problem_and_another_run_is_used(tmp_path):
    import pandas as pd

    from analysis.claims import first_dump
    from analysis.load import RunSet

    good, bad = tmp_path / "good", tmp_path / "bad"
    for run in (good, bad):
        run.mkdir()
        np.savez_compressed(run / "reward_dump.npz", log_ratio=np.array([-1.0, 0.5]), position=np.array([0, 1]))
    _truncate(bad / "reward_dump.npz")
    runs = pd.DataFrame(
        [
            {"run_id": "bad", "run_dir": str(bad), "kind": "run", "reward.name": "vanilla"},
            {"run_id": "good", "run_dir": str(good), "kind": "run", "reward.name": "power"},
        ]
    )
    runset = RunSet(runs, pd.DataFrame(columns=["run_id", "step", "metric", "value"]))
    run_id, dump = first_dump(runset)  # the vanilla run is preferred, but its dump is broken
    assert run_id == "good" and list(dump["log_ratio"]) == [-1.0, 0.5]
    assert len(runset.problems) == 1 and str(bad / "reward_dump.npz") in runset.problems[0]


# ----------------------------------------------------------------------------------------
# 12. A checkpoint being read is not pruned under the reader


def test_pruning_leaves_a_checkpoint_that_is_being_read(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_{step:06d}").mkdir(parents=True)
    with checkpoint_in_use(root / "step_000002"):
        _prune(root, 1, "step_000006")
        assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000006"]
    _prune(root, 1, "step_000006")
    assert sorted(p.name for p in root.iterdir()) == ["step_000006"]


@pytest.mark.slow
def test_submitit_local_requeues_lose_no_completed_update(tmp_path, toy_cache):
    """The submitit launcher's own code path on this machine: its local executor sends the
    time-limit signal (USR2) 30 s before a 60 s limit; the run checkpoints the update
    in flight, submitit requeues it, and the requeued job resumes from that very step."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=1",
        "+hydra.launcher.max_num_timeout=20",
        f"hydra.sweep.dir={sweep}",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        f"model_pair.cache_dir={toy_cache}",
        "training.steps=400",
        "training.save_every=0",
        "training.val_every=0",
        "training.cpu_threads=1",
        "seed=0",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next(p.parent for p in sweep.rglob("summary.json"))
    assert steps_logged(run_dir) == list(range(401))
    summary = read_json_object(run_dir / "summary.json")
    assert summary["status"] == "finished" and summary["resumed_from_step"]  # it was requeued at least once
    assert not (run_dir / "metrics.discarded").exists()  # no completed update was done twice


def test_a_resume_copies_the_student_in_place_and_a_misshapen_file_changes_nothing(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from poweropd.sharding import copy_student

    shape = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cfg = Qwen3Config(**shape, intermediate_size=32, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    saved, into = Qwen3ForCausalLM(cfg), Qwen3ForCausalLM(cfg)
    saved.save_pretrained(tmp_path / "ck")  # the tied lm-head is left out of the file
    copy_student(into, tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), into.state_dict().values()))
    assert into.lm_head.weight is into.model.embed_tokens.weight  # still one tensor
    other = Qwen3ForCausalLM(Qwen3Config(**shape, intermediate_size=48, head_dim=8, tie_word_embeddings=True))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="gate_proj.weight has shape"):
        copy_student(other, tmp_path / "ck")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing half-copied
