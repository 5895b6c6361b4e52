"""Refused commands leave nothing behind and every value of every job is checked before the
first job starts; Hydra's own command-line features still work; resuming is safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CONF_DIR, MICRO_PAIR, MICRO_TRAINING, ROOT

from poweropd.cli import check_every_job
from poweropd.errors import ConfigError
from poweropd.files import write_json_atomic
from poweropd.objectives import objective_names


def run_py(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("training.steps=-5", "training.steps"),
        ("reward.alpha=0", "alpha"),
        ("model_pair.cache_dir=/proc/nope", "cannot write the toy pair's cache folder /proc/nope"),
    ],
)
@pytest.mark.e2e
def test_a_refused_run_leaves_no_directory(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    extra = ["reward=power"] if "alpha" in override else []
    if "cache_dir" in override:  # the shipped pair needs no cache: another spec has to be built there
        extra = ["model_pair.toy.seed=1"]
    done = run_py(*extra, override, f"hydra.run.dir={run_dir}")
    _one_error_line(done, needle)
    assert not run_dir.exists()


@pytest.mark.e2e
def test_a_refused_run_after_hydra_made_the_directory_is_removed(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    done = run_py(
        *MICRO_PAIR,
        f"model_pair.cache_dir={toy_cache}",
        "training.train_data=deepscaler",
        f"training.data_dir={tmp_path / 'nowhere'}",
        f"hydra.run.dir={run_dir}",
    )
    _one_error_line(done, "does not exist")
    assert not run_dir.exists()


@pytest.mark.e2e
def test_a_missing_model_path_says_so(tmp_path):
    done = run_py(
        "model_pair=custom",
        f"model_pair.teacher={tmp_path}/no_teacher",
        f"model_pair.student={tmp_path}/no_student",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    _one_error_line(done, f"no model at {tmp_path}/no_teacher")
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_every_multirun_value_is_checked_before_the_first_job(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_py("-m", "reward=power", "reward.alpha=1,-1,5", f"hydra.sweep.dir={sweep}")
    _one_error_line(done, "job 1", "reward.alpha=-1", "no job was started")
    assert not sweep.exists()


@pytest.mark.e2e
def test_sweep_functions_expand_like_hydra(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert check_every_job(["-m", "reward=glob(*,exclude=full_vocab)"], CONF_DIR) == len(objective_names()) - 1
    assert check_every_job(["-m", "seed=range(0,3)", "reward=vanilla,power"], CONF_DIR) == 6
    assert check_every_job(["-m", "reward=power", "reward.alpha=choice(1,5)"], CONF_DIR) == 2
    assert check_every_job(["-m", "reward=power", "reward.alpha=interval(0.1,1)"], CONF_DIR) == 0  # Hydra's call
    assert check_every_job(["-cd", "sweeps", "-cn", "toy_study"], CONF_DIR) == 39  # the sweep file's own params
    with pytest.raises(ConfigError, match="job 0"):
        check_every_job(["-m", "reward=power", "reward.alpha=range(-1,2)"], CONF_DIR)


@pytest.mark.e2e
def test_a_glob_sweep_runs(tmp_path, toy_cache):
    sweep = tmp_path / "sweep"
    done = run_py(
        "-m",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        "training.steps=1",
        "training.reward_dump_prompts=0",
        f"model_pair.cache_dir={toy_cache}",
        "reward=glob(*,exclude=[box_cox,clip,full_vocab,jsd,kl_loss,power,tanh,topk_kl,zscore])",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in sweep.iterdir() if p.is_dir()] == ["0_toy_vanilla_seed0"]


@pytest.mark.e2e
def test_shell_completion_still_works():
    done = run_py("-sc", "install=bash")
    assert done.returncode == 0 and "complete" in done.stdout, done.stderr
    query = run_py("-sc", "query=bash", env={"COMP_LINE": "python run.py rewa", "COMP_POINT": "19"})
    assert query.returncode == 0 and "reward=" in query.stdout, query.stdout + query.stderr
    half = run_py("-sc", "query=bash", env={"COMP_LINE": "python run.py reward.alpha=", "COMP_POINT": "27"})
    assert half.returncode == 0, half.stderr  # a half-typed value is not refused


def test_analysis_does_not_count_refused_directories(tmp_path):
    from analysis.load import load_runs

    refused = tmp_path / "sweep" / "0_toy_vanilla_seed0"
    (refused / ".hydra").mkdir(parents=True)
    (refused / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (refused / "run.log").write_text("")
    assert load_runs(tmp_path).runs.empty


@pytest.mark.e2e
def test_a_run_with_a_recorded_config_refuses_another_before_its_first_checkpoint(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    base = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", f"hydra.run.dir={run_dir}"]
    first = run_py(*base, "training.save_every=0", "training.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir / "summary.json").unlink()  # as if killed before its first checkpoint
    metrics = (run_dir / "metrics.jsonl").read_text()
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    done = run_py(*base, "training.save_every=0", "training.steps=2", "reward=power")
    _one_error_line(done, "different config", "reward.name")
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing of the old run moved away
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config


@pytest.mark.e2e
def test_restarting_a_finished_run_leaves_its_hydra_files_alone(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    base = [*MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}", f"hydra.run.dir={run_dir}"]
    assert run_py(*base, "training.steps=2").returncode == 0
    before = {p.name: p.read_text() for p in (run_dir / ".hydra").glob("*.yaml")}
    again = run_py(*base, "training.steps=2", "training.save_every=1")  # a change Hydra would record
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.read_text() for p in (run_dir / ".hydra").glob("*.yaml")} == before


def test_two_writers_of_one_file_never_collide(tmp_path):
    path = tmp_path / "toy.json"
    errors = []

    def writer(tag):
        try:
            for i in range(200):
                write_json_atomic(path, {"writer": tag, "i": i})
        except Exception as exc:  # noqa: BLE001 - the test is that nothing is raised
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(path.read_text())["i"] == 199
    assert [p.name for p in Path(tmp_path).iterdir()] == ["toy.json"]  # no temporary left over


@pytest.mark.e2e
def test_evaluate_py_gets_the_same_pre_check(tmp_path):
    def evaluate_py(*args):
        return subprocess.run(
            [sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )

    done = evaluate_py("-m", "model=teacher", "eval.n=8,0", f"output_root={tmp_path}", f"hydra.sweep.dir={tmp_path}/s")
    _one_error_line(done, "job 1", "eval.n", "no job was started")
    assert not list(tmp_path.iterdir())
    assert evaluate_py("-sc", "install=bash").returncode == 0
