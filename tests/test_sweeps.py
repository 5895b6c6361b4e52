"""Experiment (pair x scale) presets, sweep files and launchers: everything composes, sweeps only real keys,
and a micro multirun goes through the basic and the joblib launchers into a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, MICRO_PAIR, MICRO_TRAINING, ROOT

from poweropd.cli import check_overrides

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_from(config_dir: Path, name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from poweropd.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_validates(preset):
    from conftest import make_config

    run = make_config([f"experiment={preset}"])
    if preset.startswith("paper_"):
        tc = run.training
        assert (tc.steps, tc.batch_size, tc.lr, tc.max_new_tokens) == (1500, 32, 5e-7, 1024)
        assert run.model_pair.kind == "hf" and run.model_pair.teacher.startswith("Qwen/Qwen3-")
    assert run.reward.name == "vanilla"  # a pair x scale preset leaves the objective to reward= / method=
    if preset.startswith("paper_"):
        row = make_config([f"experiment={preset}", "method=power0.1"])
        assert (row.reward.name, row.reward.alpha, row.training) == ("power", 0.1, run.training)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_file_composes_and_sweeps_only_real_keys(sweep, monkeypatch):
    monkeypatch.chdir(ROOT)  # sweep files find conf/ relative to the repo root
    head = sweep.read_text().splitlines()[0]
    assert head.startswith("# Question:"), "each sweep file opens with the question it answers"
    assert "python " in sweep.read_text(), "and gives the exact command"
    cfg = compose_from(ROOT / "sweeps", sweep.stem, [])
    params = dict(cfg.hydra.sweeper.params)
    assert params
    check_overrides([f"{k}={v}" for k, v in params.items()], CONF_DIR)  # raises on an unknown key or option
    assert cfg.hydra.mode.name == "MULTIRUN"


def micro_sweep(sweep_dir: Path, toy_cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            *MICRO_PAIR,
            *MICRO_TRAINING,
            "training.steps=2",
            f"model_pair.cache_dir={toy_cache}",
            "reward=vanilla,power",
            "seed=0,1",
            f"hydra.sweep.dir={sweep_dir}",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("launcher", ["basic", "cpu_parallel"])
@pytest.mark.e2e
def test_micro_multirun_through_each_launcher_to_a_report(tmp_path, toy_cache, launcher):
    sweep = tmp_path / "sweep"
    extra = [] if launcher == "basic" else ["hydra/launcher=cpu_parallel", "training.cpu_threads=1"]
    done = micro_sweep(sweep, toy_cache, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == ["0_toy_vanilla_seed0", "1_toy_vanilla_seed1", "2_toy_power5_seed0", "3_toy_power5_seed1"]
    assert all((sweep / n / "summary.json").is_file() for n in names)

    # Started again over the same sweep directory: finished runs are left alone.
    before = {n: (sweep / n / "summary.json").stat().st_mtime_ns for n in names}
    again = micro_sweep(sweep, toy_cache, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {n: (sweep / n / "summary.json").stat().st_mtime_ns for n in names} == before

    ev = subprocess.run(
        [sys.executable, "evaluate.py", f"sweep_dir={sweep}", "eval.n=1", "eval.limit=4", "eval.max_new_tokens=8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert all((sweep / n / "eval" / "toy.json").is_file() for n in names)
    report = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = (sweep / "report" / "report.md").read_text()
    assert "| Vanilla | 2 |" in text and "| PowerOPD α=5 | 2 |" in text  # two seeds averaged per row


def test_a_seed_only_sweep_stays_under_the_output_root(tmp_path):
    cfg = compose_from(CONF_DIR, "config", [f"output_root={tmp_path}", "seed=3"])
    from omegaconf import OmegaConf

    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep_dir["dir"].startswith("${output_root}/")
    assert "seed" in sweep_dir["subdir"] and not sweep_dir["subdir"].startswith("/")


def test_the_toy_study_covers_every_table_row_with_three_seeds(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = compose_from(ROOT / "sweeps", "toy_study", [])
    params = dict(cfg.hydra.sweeper.params)
    rows = params["method"].split(",")
    assert len(rows) == 13 and all((CONF_DIR / "method" / f"{r}.yaml").is_file() for r in rows)
    assert "model_pair" not in params and "experiment" not in params  # the toy pair and scale are the defaults
    assert params["seed"] == "0,1,2"
    assert yaml.safe_load((ROOT / "conf" / "hydra" / "launcher" / "cpu_parallel.yaml").read_text())["n_jobs"] == 2
    assert json.dumps(dict(cfg.hydra.launcher)).count("Joblib") == 1


def test_the_beyond_sweep_runs_each_new_objective_at_the_studys_seeds(monkeypatch):
    from conftest import make_config

    from analysis.report import is_paper_row

    monkeypatch.chdir(ROOT)
    cfg = compose_from(ROOT / "sweeps", "toy_beyond", [])
    params = dict(cfg.hydra.sweeper.params)
    rows = params["method"].split(",")
    assert params["seed"] == "0,1,2" and cfg.hydra.sweep.dir == f"{cfg.output_root}/beyond"
    names = set()
    for row in rows:
        reward = make_config([f"method={row}"]).reward
        names.add(reward.name)
        flat = {"kind": "run", **{f"reward.{k}": v for k, v in vars(reward).items()}}
        assert not is_paper_row(flat), row  # lands in the beyond-the-paper table, not in Tables 2/3
    assert {"jsd", "topk_kl", "kl_loss", "box_cox"} <= names


def test_the_slurm_launcher_requeues_and_claims_no_unmeasured_time(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = compose_from(CONF_DIR, "config", ["hydra/launcher=slurm_gpu"])
    launcher = cfg.hydra.launcher
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # a timed-out job comes back
    assert "fit in a day" not in (CONF_DIR / "hydra" / "launcher" / "slurm_gpu.yaml").read_text()


@pytest.mark.e2e
def test_a_requeued_sweep_job_resumes_from_its_last_checkpoint(tmp_path, toy_cache):
    """What a SLURM requeue does: the job is killed (time limit), then the same job (same
    overrides, same sweep directory) is started again; it must resume, not restart."""
    import os
    import signal
    import time

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        "training.steps=40",
        "training.save_every=2",
        "training.val_every=0",
        f"model_pair.cache_dir={toy_cache}",
        "reward=power",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = sweep / "0_toy_power5_seed0" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the time limit: no chance to clean up
    proc.wait()
    assert latest.exists(), "the job never wrote a checkpoint"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = sweep / "0_toy_power5_seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from_step"] >= 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(41))
