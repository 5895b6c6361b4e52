"""analysis/: loading run directories, Tables 2-4, the FLOPs model, the claims check and
the report, on synthetic run directories written here and on a real micro toy sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT

from analysis.claims import check_claims
from analysis.load import RunSet, load_runs, load_wandb
from analysis.tables import efficiency_markdown, efficiency_rows, ranks, results_table, to_latex, to_markdown
from poweropd.flops import QWEN3, arch_from_hf_config, paper_table4_flops, update_flops
from poweropd.objectives import method_label

BENCH = ("gsm8k", "math500", "amc23", "aime24", "aime25", "minerva", "olympiadbench")


def make_run(
    root: Path,
    name: str,
    reward: str,
    alpha: float = 5.0,
    seed: int = 0,
    steps: int = 20,
    finished: bool = True,
    avg: float | None = None,
    grad: float = 1.0,
    length: float = 30.0,
    step_time: float = 0.2,
    mem: float = 1.0,
    skip_bench: tuple = (),
    lr: float = 1e-4,
) -> Path:
    """A run directory with the layout run.py writes (only what analysis reads)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "output_root": "outputs",
        "model_pair": {"name": "toy", "kind": "toy", "cache_dir": f"/cache/{seed}"},
        "reward": {"name": reward, "alpha": alpha, "normalize": "none"},
        "training": {"lr": lr, "batch_size": 32, "max_new_tokens": 64},
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"reward={reward}", f"seed={seed}"] + ([f"reward.alpha={alpha:g}"] if reward == "power" else [])
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "run_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    with (run / "metrics.jsonl").open("w") as handle:
        handle.write(json.dumps({"step": 0, "val/accuracy": 0.1, "val/response_length": length}) + "\n")
        for step in range(1, steps + 1):
            line = {
                "step": step,
                "grad_norm": grad * (1 + 0.1 * rng.random()),
                "response_length": length - step * 0.01 * alpha,
                "log_ratio/min": -20.0 + rng.random(),
                "log_ratio/max": 2.0,
                "log_ratio/p5": -3.0,
                "log_ratio/p95": 1.0,
                "step_time": step_time,
            }
            if step % 5 == 0:
                line["val/accuracy"] = (avg or 0.2) + 0.001 * step
                line["val/response_length"] = length - step * 0.01 * alpha
            handle.write(json.dumps(line) + "\n")
    # The student is confident in its own samples; on a few tokens the teacher strongly disagrees.
    lS = -rng.exponential(0.3, 400)
    lT = np.where(rng.random(400) < 0.05, lS - rng.exponential(8, 400), lS + rng.normal(0, 0.1, 400))
    position = np.tile(np.arange(40), 10)
    lT[position < 2] -= 30  # the extremes sit at early positions
    lr_ = lT - lS
    np.savez(run / "reward_dump.npz", position=position, teacher_logprob=lT, student_logprob=lS, log_ratio=lr_)
    if finished:
        summary = {"status": "finished", "median_step_time": step_time, "peak_mem_gb": mem}
        (run / "summary.json").write_text(json.dumps(summary))
    if avg is not None:
        benchmarks = {
            b: {"avg_at_n": avg + i / 100, "pass_at_n": min(1.0, avg + 0.2), "length": 100.0 + i, "n": 8}
            for i, b in enumerate(BENCH)
            if b not in skip_bench
        }
        mean = {k: float(np.mean([m[k] for m in benchmarks.values()])) for k in ("avg_at_n", "pass_at_n", "length")}
        (run / "eval").mkdir()
        (run / "eval" / "math7.json").write_text(json.dumps({"suite": "math7", "benchmarks": benchmarks, "mean": mean}))
    return run


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    # Directory names are deliberately misleading: runs are identified by their config only.
    make_run(root, "0_vanilla_seed9", "power", alpha=500, seed=0, avg=0.40, grad=0.2, length=20)
    make_run(root, "1_x", "power", alpha=500, seed=1, avg=0.44, grad=0.2, length=20)
    make_run(root, "2_x", "power", alpha=5, seed=0, avg=0.38, grad=0.3, length=28)
    make_run(root, "nested/deeper/3_x", "power", alpha=50, seed=0, avg=0.36, grad=0.25, length=24)
    make_run(root, "4_x", "vanilla", seed=0, avg=0.30, grad=8.0, step_time=0.2, mem=1.0)
    make_run(root, "5_x", "clip", seed=0, avg=0.35, grad=2.0, skip_bench=("aime25",))
    make_run(root, "6_x", "full_vocab", seed=0, avg=0.37, grad=3.0, step_time=0.5, mem=2.0)
    make_run(root, "7_crashed", "tanh", seed=0, finished=False, steps=3)
    with (root / "4_x" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 21, "grad_no')  # a partial last line, as a kill leaves it
    return root


def test_runs_are_found_by_config_and_flattened_into_override_names(sweep):
    rs = load_runs(sweep)
    assert len(rs.runs) == 8
    power500 = rs.runs[(rs.runs["reward.name"] == "power") & (rs.runs["reward.alpha"] == 500)]
    assert sorted(power500["seed"]) == [0, 1] and set(power500["method"]) == {"PowerOPD α=500"}
    assert power500["group"].nunique() == 1  # seeds share a group (cache_dir differs too: not config)
    assert "0_vanilla_seed9" in set(power500["run_id"])  # the name says vanilla; the config says power
    assert set(rs.runs["method"]) >= {"Vanilla", "+ Clip", "Full-vocab", "+ Tanh", "PowerOPD α=5", "PowerOPD α=50"}
    crashed = rs.runs[rs.runs["run_id"] == "7_crashed"].iloc[0]
    assert not crashed["finished"] and crashed["status"] == "unfinished"
    assert "7_crashed" not in set(rs.finished["run_id"])
    assert any("4_x/metrics.jsonl:22: corrupted or partial line" in p for p in rs.problems)
    curve = rs.curves[(rs.curves["run_id"] == "4_x") & (rs.curves["metric"] == "grad_norm")]
    assert len(curve) == 20  # the rest of the file still loads
    cmd = rs.runs[rs.runs["run_id"] == "1_x"]["command"].iloc[0]
    assert cmd == "python run.py reward=power seed=1 reward.alpha=500"


def test_labels_tell_apart_groups_of_one_method(tmp_path):
    make_run(tmp_path, "a", "vanilla", lr=1e-4)
    make_run(tmp_path, "b", "vanilla", lr=3e-4)
    labels = set(load_runs(tmp_path).runs["label"])
    assert labels == {"Vanilla (training.lr=0.0001)", "Vanilla (training.lr=0.0003)"}


def test_method_labels_follow_the_paper():
    assert [
        method_label({"name": n, "alpha": 500.0}) for n in ("vanilla", "clip", "tanh", "zscore", "full_vocab", "power")
    ] == [
        "Vanilla",
        "+ Clip",
        "+ Tanh",
        "+ Z-Score",
        "Full-vocab",
        "PowerOPD α=500",
    ]
    assert method_label({"name": "power", "alpha": 0.1}) == "PowerOPD α=0.1"


def test_results_table_averages_seeds_marks_best_and_explains_missing_cells(sweep):
    rs = load_runs(sweep)
    table = results_table(rs.runs, "math7")
    labels = [r["label"] for r in table.rows]
    assert labels == ["Full-vocab", "Vanilla", "+ Clip", "PowerOPD α=5", "PowerOPD α=50", "PowerOPD α=500"]
    p500 = table.rows[-1]
    mean, std, n = p500[("GSM8K", "avg_at_n")]
    assert (round(mean, 6), n) == (42.0, 2) and std == pytest.approx(np.std([40, 44], ddof=1))
    marks = ranks(table)
    assert marks[("GSM8K", "avg_at_n")] == {"PowerOPD α=500": 1, "PowerOPD α=5": 2}
    assert marks[("Mean", "avg_at_n")]["PowerOPD α=500"] == 1
    md = to_markdown(table)
    assert "**42.0 ± 2.8**" in md and "<u>38.0</u>" in md
    clip_line = next(line for line in md.splitlines() if line.startswith("| + Clip"))
    assert " - |" in clip_line  # AIME25 missing for the clip run
    assert any("5_x" in note and "AIME25" in note and "evaluate.py run_dir=" in note for note in table.notes)
    tex = to_latex(table)
    assert "\\toprule" in tex and "\\textbf{42.0 $\\pm$ 2.8}" in tex and "\\underline{38.0}" in tex
    assert "PowerOPD $\\alpha$=500" in tex


def test_reference_rows_are_shown_but_not_ranked(sweep):
    teacher = sweep / "evals" / "toy_teacher" / "eval"
    teacher.mkdir(parents=True)
    benchmarks = {b: {"avg_at_n": 0.9, "pass_at_n": 0.95, "length": 50.0} for b in BENCH}
    (teacher / "math7.json").write_text(json.dumps({"suite": "math7", "benchmarks": benchmarks, "mean": {}}))
    table = results_table(load_runs(sweep).runs, "math7")
    assert table.rows[0]["label"] == "Teacher" and table.rows[0]["reference"]
    assert ranks(table)[("GSM8K", "avg_at_n")] == {"PowerOPD α=500": 1, "PowerOPD α=5": 2}
    # The evals folder itself given as a root (as the toy study's report does) finds it too.
    alone = load_runs([sweep / "evals"]).runs
    assert list(alone["method"]) == ["Teacher"] and alone["kind"].tolist() == ["reference"]


def test_flops_model_reproduces_the_paper():
    tf = paper_table4_flops()
    assert round(tf["teacher_pass"], 1) == 254.8
    assert round(tf["student_pass"], 1) == 30.6
    assert round(tf["teacher_head"], 1) == 25.5
    assert round(tf["student_head"], 1) == 30.6
    assert round(tf["sampled_token"], 1) == 346.6
    parts = [round(tf[k], 1) for k in ("sampled_token", "teacher_head", "student_head")]
    assert round(sum(parts), 1) == 402.7  # the paper adds the rounded parts
    assert tf["full_vocab"] == pytest.approx(402.64, abs=0.01)
    conf = {
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "intermediate_size": 3072,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    }
    assert arch_from_hf_config(conf) == QWEN3["Qwen/Qwen3-0.6B-Base"]
    # Doubling the response adds the S^2 attention term: more than 2x but less than 4x the pass.
    a = update_flops(QWEN3["Qwen/Qwen3-4B"], QWEN3["Qwen/Qwen3-0.6B-Base"], 32, 128, 1024)["teacher_pass"]
    b = update_flops(QWEN3["Qwen/Qwen3-4B"], QWEN3["Qwen/Qwen3-0.6B-Base"], 32, 256, 2048)["teacher_pass"]
    assert 2 < b / a < 4


def test_efficiency_table_compares_sampled_token_with_full_vocab(sweep, tmp_path):
    rows = efficiency_rows(load_runs(sweep).runs)
    full = next(r for r in rows if r["method"].startswith("Full"))
    sampled = next(r for r in rows if r["method"].startswith("Sampled"))
    assert (full["step_time_s"], sampled["step_time_s"]) == (0.5, 0.2)
    assert (full["peak_mem_gb"], sampled["peak_mem_gb"]) == (2.0, 1.0)
    md = efficiency_markdown(rows)
    assert "↓60.0%" in md and "↓50.0%" in md


def test_claims_are_checked_with_their_numbers(sweep):
    rs = load_runs(sweep)
    claims = {c.name: c for c in check_claims(RunSet(rs.finished, rs.curves))}
    assert claims["gradient norms"].verdict == "reproduced" and "x smaller" in claims["gradient norms"].measured
    assert claims["heavy negative tail"].verdict == "reproduced"
    assert claims["extremes at early positions"].verdict == "reproduced"
    assert claims["length vs alpha"].verdict == "reproduced"
    assert claims["accuracy ordering"].verdict in ("reproduced", "not reproduced")
    assert "best PowerOPD" in claims["accuracy ordering"].measured


def test_early_positions_partly_reproduce_when_only_the_mean_disagreement_is_early():
    """The toy's pattern: position 0 has the most negative mean log-ratio (openings), while the
    1% most negative values are rare digit errors further on."""
    from analysis.claims import early_positions_in_dump

    rng = np.random.default_rng(0)
    pos = np.tile(np.arange(40), 200)
    lr = rng.normal(0.0, 0.05, pos.size)
    lr[pos == 0] = -2.5  # every rollout's first token: systematic disagreement
    errors = rng.choice(np.flatnonzero(pos >= 20), 100, replace=False)
    lr[errors] = -15.0  # rare confident digit errors, late
    claim = early_positions_in_dump("r", {"log_ratio": lr, "position": pos}, "paper")
    assert claim.verdict == "partly reproduced" and "position 0 (-2.50" in claim.measured
    lr[errors] = -1.0
    lr[rng.choice(np.flatnonzero(pos < 5), 100, replace=False)] = -15.0  # extremes early: the paper's case
    assert early_positions_in_dump("r", {"log_ratio": lr, "position": pos}, "paper").verdict == "reproduced"
    lr[pos < 5] = 0.0
    lr[pos == 30] = -3.0
    assert early_positions_in_dump("r", {"log_ratio": lr, "position": pos}, "paper").verdict == "not reproduced"


def test_wandb_runs_load_into_the_same_frames():
    class FakeRun:
        id, state = "abc", "finished"
        config = {"seed": 1, "reward": {"name": "power", "alpha": 50.0}, "_wandb": {}}
        summary = {"grad_norm": 0.3, "_runtime": 3}

        def scan_history(self):
            return [{"_step": 1, "grad_norm": 0.3}, {"_step": 2, "grad_norm": 0.2, "val/accuracy": 0.5}]

    class FakeApi:
        def runs(self, path):
            assert path == "me/proj"
            return [FakeRun()]

    rs = load_wandb("proj", "me", api=FakeApi())
    row = rs.runs.iloc[0]
    assert (row["method"], row["seed"], row["finished"]) == ("PowerOPD α=50", 1, True)
    assert sorted(rs.curves["metric"]) == ["grad_norm", "grad_norm", "val/accuracy"]


@pytest.mark.e2e
def test_report_on_synthetic_runs_embeds_every_figure_and_table(sweep, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(sweep), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "report.md").read_text()
    for fig in ("fig2a", "fig2b", "fig2c", "fig3", "fig4", "fig5", "fig6"):
        assert f"figures/{fig}" in report, fig
    for png in out.glob("figures/*.png"):
        assert png.with_suffix(".pdf").is_file()
    assert "python run.py reward=power seed=1 reward.alpha=500" in report
    assert "Unfinished" in report and "7_crashed" in report
    assert (out / "tables" / "results_math7.tex").is_file() and (out / "tables" / "efficiency.tex").is_file()
    assert "corrupted or partial line" in report


@pytest.mark.e2e
def test_report_refuses_a_missing_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "does not exist" in done.stderr


@pytest.mark.e2e
def test_report_on_a_real_micro_toy_sweep(tmp_path, toy_cache):
    sweep = tmp_path / "sweep"
    train = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            *MICRO_PAIR,
            *MICRO_TRAINING,
            f"model_pair.cache_dir={toy_cache}",
            "reward=vanilla,power",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    run_dirs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/config.yaml"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        done = subprocess.run(
            [sys.executable, "evaluate.py", f"run_dir={run_dir}", "eval.n=2", "eval.limit=4", "eval.max_new_tokens=16"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = (sweep / "report" / "report.md").read_text()
    assert "| Vanilla |" in text and "PowerOPD α=5" in text and "Toy test Avg" in text
    assert "figures/fig2a" in text and "figures/fig6" in text
    # The tables people reuse: one row per run, one row per (run, step, metric), CSV and Parquet.
    out = sweep / "report"
    runs_csv, runs_pq = pd.read_csv(out / "runs.csv"), pd.read_parquet(out / "runs.parquet")
    assert len(runs_csv) == len(runs_pq) == 2 and set(runs_pq["reward.name"]) == {"vanilla", "power"}
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == ["run_id", "step", "metric", "value"]
    assert len(metrics) == len(pd.read_csv(out / "metrics.csv")) and "grad_norm" in set(metrics["metric"])
