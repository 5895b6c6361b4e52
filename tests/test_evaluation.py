"""Evaluation: the metric definitions, evaluate.py end to end, resuming, and the lm-eval cross-check."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations
from math import comb

import pytest
from conftest import CONF_DIR, MICRO_PAIR, MICRO_TRAINING, ROOT

from poweropd.errors import ConfigError
from poweropd.evaluation import benchmark_metrics, pass_at_k, suite_mean


def records(correct_by_problem: dict[str, list[bool]], length: int = 10) -> list[dict]:
    out = []
    for pid, flags in correct_by_problem.items():
        for j, ok in enumerate(flags):
            status = "correct" if ok else ("no_answer" if j == 0 else "incorrect")
            out.append(
                {"id": pid, "sample": j, "correct": ok, "status": status, "length": length + j, "truncated": j == 3}
            )
    return out


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_probability_that_k_draws_contain_a_correct_one(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            draws = list(combinations(outcomes, k))
            exact = sum(any(d) for d in draws) / len(draws)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(n, 0, n + 1)


def test_avg_and_pass_at_n_on_hand_made_samples():
    samples = records(
        {
            "p1": [True, True, True, True],  # 4/4
            "p2": [False, True, False, False],  # 1/4
            "p3": [False, False, False, False],  # 0/4
        }
    )
    m = benchmark_metrics(samples, n=4)
    assert m["problems"] == 3
    assert m["avg_at_n"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["pass_at_n"] == pytest.approx(2 / 3)
    assert m["pass_at_1"] == pytest.approx(m["avg_at_n"])  # pass@1 is Avg@n
    assert m["pass_at_4"] == pytest.approx(m["pass_at_n"])
    assert m["pass_at_2"] == pytest.approx((1 + (1 - comb(3, 2) / comb(4, 2)) + 0) / 3)
    assert m["length"] == pytest.approx(10 + 1.5)
    assert m["truncation_rate"] == pytest.approx(3 / 12)
    assert m["no_answer_rate"] == pytest.approx(2 / 12)  # first sample of p2 and p3
    assert m["timeouts"] == 0


def test_a_missing_sample_is_an_error_not_a_smaller_denominator():
    samples = records({"p1": [True, False], "p2": [True]})
    with pytest.raises(ValueError, match="expected 2 samples"):
        benchmark_metrics(samples, n=2)


def test_the_mean_column_is_unweighted_over_benchmarks():
    a = benchmark_metrics(records({"p": [True, True]}), 2)
    b = benchmark_metrics(records({f"q{i}": [False, False] for i in range(9)}), 2)
    assert suite_mean({"a": a, "b": b})["avg_at_n"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------
# evaluate.py on the micro pair


def evaluate_cli(*overrides: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *overrides], cwd=cwd, capture_output=True, text=True, timeout=600
    )


MICRO_EVAL = ["eval.n=2", "eval.limit=6", "eval.max_new_tokens=16", "eval.batch_size=8"]


@pytest.mark.e2e
def test_evaluate_a_pair_model_writes_the_contract(tmp_path, toy_cache):
    common = [*MICRO_PAIR, f"model_pair.cache_dir={toy_cache}", f"output_root={tmp_path}", *MICRO_EVAL]
    done = evaluate_cli("model=teacher", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "evals" / "toy_teacher" / "eval"
    summary = json.loads((folder / "toy.json").read_text())
    assert summary["suite"] == "toy" and list(summary["benchmarks"]) == ["toy_test"]
    m = summary["benchmarks"]["toy_test"]
    assert m["problems"] == 6 and m["n"] == 2 and m["settings"]["temperature"] == 0.6
    samples = [json.loads(line) for line in (folder / "toy" / "toy_test.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
    assert set(samples[0]) >= {"id", "sample", "response", "extracted", "correct", "status", "length"}
    assert benchmark_metrics(samples, 2)["avg_at_n"] == m["avg_at_n"]  # every number can be audited
    assert "Avg@n" in done.stdout and "Toy test" in done.stdout

    # Started again with the same settings: nothing is redone (the samples file is untouched).
    before = (folder / "toy" / "toy_test.samples.jsonl").stat().st_mtime_ns
    again = evaluate_cli("model=teacher", *common)
    assert again.returncode == 0 and "already evaluated" in again.stderr + again.stdout
    assert (folder / "toy" / "toy_test.samples.jsonl").stat().st_mtime_ns == before
    # Other settings over finished results: refused in one line, nothing lost.
    changed = evaluate_cli("model=teacher", *common, "eval.temperature=1.0")
    assert changed.returncode == 2 and "different settings (temperature)" in changed.stderr
    assert (folder / "toy" / "toy_test.samples.jsonl").stat().st_mtime_ns == before


@pytest.mark.e2e
def test_an_interrupted_suite_redoes_only_the_unfinished_benchmarks(tmp_path, toy_cache):
    common = [*MICRO_PAIR, f"model_pair.cache_dir={toy_cache}", f"output_root={tmp_path}", *MICRO_EVAL]
    both = "eval.benchmarks=[toy_val,toy_test]"
    assert evaluate_cli("model=student", both, *common).returncode == 0
    folder = tmp_path / "evals" / "toy_student" / "eval"
    first = json.loads((folder / "toy_val+toy_test.json").read_text())
    # As if killed while the second benchmark ran: its result and the suite file never got written.
    (folder / "toy_val+toy_test" / "toy_test.json").unlink()
    (folder / "toy_val+toy_test.json").unlink()
    kept = (folder / "toy_val+toy_test" / "toy_val.samples.jsonl").stat().st_mtime_ns
    again = evaluate_cli("model=student", both, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (folder / "toy_val+toy_test" / "toy_val.samples.jsonl").stat().st_mtime_ns == kept
    second = json.loads((folder / "toy_val+toy_test.json").read_text())
    # Each benchmark samples from its own seeded stream: the redone one repeats its numbers.
    for name in ("toy_val", "toy_test"):
        for key in ("avg_at_n", "pass_at_n", "length"):
            assert second["benchmarks"][name][key] == first["benchmarks"][name][key]
    assert second["mean"] == first["mean"]


@pytest.mark.e2e
def test_evaluate_a_training_run_uses_its_saved_pair(tmp_path, toy_cache):
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            *MICRO_PAIR,
            *MICRO_TRAINING,
            f"model_pair.cache_dir={toy_cache}",
            "model_pair.instruction= Put the answer in a box.",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    done = evaluate_cli(f"run_dir={run_dir}", *MICRO_EVAL, "eval.temperature=0", "eval.n=1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "eval" / "toy.json").read_text())
    assert summary["model_path"] == str(run_dir / "student")
    assert (run_dir / ".hydra" / "config.yaml").read_text().count("Put the answer in a box.") == 1  # training's own

    ckpt = evaluate_cli(f"run_dir={run_dir}", "checkpoint=step_000002", *MICRO_EVAL, "eval.n=1")
    assert ckpt.returncode == 0, ckpt.stderr[-3000:]
    assert (run_dir / "eval" / "step_000002" / "eval" / "toy.json").is_file()
    missing = evaluate_cli(f"run_dir={run_dir}", "checkpoint=step_000999")
    assert missing.returncode == 2 and "step_000999 not found" in missing.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("eval.n=0", "eval.n must be > 0"),
        ("eval.backend=sglang", "eval.backend='sglang' is not valid; choose one of: hf, vllm, lm_eval"),
        ("eval.lm_eval_model=sglang", "eval.lm_eval_model='sglang' is not valid; choose one of: hf, vllm"),
        ("eval.tempreature=0.1", "did you mean 'eval.temperature'"),
        ("eval=fast", "unknown eval 'fast'"),
        ("eval.suite=math8", "unknown suite 'math8'"),
        ("run_dir=/nonexistent/run", "holds no run_config.json"),
    ],
)
@pytest.mark.e2e
def test_bad_evaluate_input_is_one_line(override, expected, tmp_path):
    done = evaluate_cli(override, f"output_root={tmp_path}", f"model_pair.cache_dir={tmp_path / 'cache'}")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "cache").exists()  # refused before any model was built or loaded


def test_evaluate_composes_each_eval_preset():
    from hydra import compose, initialize_config_dir

    from poweropd.config import EvaluateConfig, register_configs, to_config

    register_configs()
    for preset in sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = to_config(compose(config_name="evaluate", overrides=[f"eval={preset}"]), EvaluateConfig)
        assert cfg.eval.n >= 1
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="evaluate"), EvaluateConfig)
    assert (cfg.eval.n, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k, cfg.eval.max_new_tokens) == (
        8,
        0.6,
        0.95,
        20,
        4096,
    )
    with pytest.raises(ConfigError):
        to_config(compose_eval(["eval.top_p=1.5"]), EvaluateConfig)


def compose_eval(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


# ----------------------------------------------------------------------------------------
# The lm-eval backend gives the same answers as ours


@pytest.mark.e2e
def test_lm_eval_backend_matches_the_hf_backend_greedy(tmp_path, toy_cache):
    common = [
        *MICRO_PAIR,
        f"model_pair.cache_dir={toy_cache}",
        "eval.n=2",
        "eval.limit=8",
        "eval.temperature=0",
        "eval.max_new_tokens=24",
        "model=teacher",
    ]
    results = {}
    for backend in ("hf", "lm_eval"):
        done = evaluate_cli(*common, f"eval.backend={backend}", f"output_root={tmp_path / backend}")
        assert done.returncode == 0, done.stderr[-3000:]
        folder = tmp_path / backend / "evals" / "toy_teacher" / "eval"
        results[backend] = (
            json.loads((folder / "toy.json").read_text())["benchmarks"]["toy_test"],
            [json.loads(line) for line in (folder / "toy" / "toy_test.samples.jsonl").read_text().splitlines()],
        )
    (hf, hf_samples), (le, le_samples) = results["hf"], results["lm_eval"]
    assert [s["response"].strip() for s in hf_samples] == [s["response"].strip() for s in le_samples]
    assert le["avg_at_n"] == hf["avg_at_n"] == pytest.approx(le["lm_eval_avg_at_n"])
    assert le["pass_at_n"] == pytest.approx(le["lm_eval_pass_at_n"])
    assert [s["length"] for s in hf_samples] == [s["length"] for s in le_samples]


@pytest.mark.slow
def test_toy_teacher_is_far_ahead_of_the_student_and_the_backends_agree(tmp_path):
    """The default toy pair (built on first use, minutes) at the paper's evaluation settings."""
    from pathlib import Path

    cache = f"model_pair.cache_dir={Path.home() / '.cache' / 'poweropd'}"
    scores = {}
    for model in ("teacher", "student"):
        done = evaluate_cli(f"model={model}", cache, f"output_root={tmp_path}")
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((tmp_path / "evals" / f"toy_{model}" / "eval" / "toy.json").read_text())
        scores[model] = summary["benchmarks"]["toy_test"]
    assert scores["teacher"]["problems"] == 500 and scores["teacher"]["n"] == 8
    assert scores["teacher"]["avg_at_n"] >= 0.85
    assert scores["student"]["avg_at_n"] <= 0.5
    assert scores["teacher"]["avg_at_n"] - scores["student"]["avg_at_n"] >= 0.4

    greedy = {}
    for backend in ("hf", "lm_eval"):
        out = tmp_path / backend
        done = evaluate_cli(
            "model=teacher", cache, "eval=greedy", "eval.limit=64", f"eval.backend={backend}", f"output_root={out}"
        )
        assert done.returncode == 0, done.stderr[-3000:]
        greedy[backend] = json.loads((out / "evals" / "toy_teacher" / "eval" / "toy.json").read_text())["benchmarks"]
    assert greedy["hf"]["toy_test"]["avg_at_n"] == greedy["lm_eval"]["toy_test"]["avg_at_n"] >= 0.8
