"""The toy study's protocol: the shared learning rate is chosen on validation numbers only,
ordering claims carry their uncertainty, and the whole one-command study runs end to end on
the micro pair."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT

from analysis.study import (
    Group,
    Ordering,
    choose_lr,
    compare,
    lr_markdown,
    ordering_claims,
    paired_bootstrap,
)


def _frame(scores: dict[tuple[str, float], float]) -> pd.DataFrame:
    rows = [
        {"method": m, "reward": m.lower(), "lr": lr, "seed": 0, "final_val": v, "initial_val": 0.3, "status": status}
        for (m, lr), (v, status) in ((k, v if isinstance(v, tuple) else (v, "finished")) for k, v in scores.items())
    ]
    return pd.DataFrame(rows)


def test_the_shared_lr_maximises_the_mean_over_methods_not_one_method():
    frame = _frame(
        {
            ("Vanilla", 1e-4): 0.40,
            ("Vanilla", 1e-3): 0.10,
            ("Full-vocab", 1e-4): 0.42,
            ("Full-vocab", 1e-3): 0.60,  # the single best cell, but the mean at 1e-3 is lower
        }
    )
    assert choose_lr(frame) == 1e-4
    text = lr_markdown(frame, 1e-4)
    assert "lr 0.0001 (chosen)" in text and "Mean (the selection rule)" in text


def test_a_collapsed_run_counts_against_its_learning_rate():
    frame = _frame(
        {
            ("Vanilla", 1e-4): 0.40,
            ("Full-vocab", 1e-4): 0.40,
            ("Vanilla", 3e-3): (0.0, "collapsed"),
            ("Full-vocab", 3e-3): 0.95,
        }
    )
    assert choose_lr(frame) == 3e-3  # (0 + 95) / 2 > 40: the collapse is scored, not skipped
    assert "0.0 (collapsed)" in lr_markdown(frame, 3e-3)


def test_a_learning_rate_missing_a_method_cannot_win():
    frame = _frame({("Vanilla", 1e-4): 0.40, ("Full-vocab", 1e-4): 0.40, ("Vanilla", 3e-3): 0.90})
    assert choose_lr(frame) == 1e-4
    with pytest.raises(ValueError, match="no learning rate"):
        choose_lr(_frame({("Vanilla", 1e-4): 0.4, ("Full-vocab", 1e-3): 0.4}))


def test_paired_bootstrap_interval_brackets_the_difference_and_is_paired():
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(500)]
    a = pd.Series(rng.integers(0, 9, 500) / 8, index=ids)
    same = paired_bootstrap(a, a)
    assert same == (0.0, 0.0, 0.0)  # identical per-problem results: no difference, no spread
    b = (a - 0.05).clip(lower=0)
    diff, lo, hi = paired_bootstrap(a, b)
    assert lo <= diff <= hi and lo > 0
    assert diff == pytest.approx((a - b).mean() * 100)
    shuffled = pd.Series(a.to_numpy()[::-1], index=ids)  # same values, unpaired
    _, lo2, hi2 = paired_bootstrap(a, shuffled)
    assert hi2 - lo2 > hi - lo  # pairing is what makes the interval narrow


def _group(label, reward, per_seed_shift, final_val, n=200, seeds=(0, 1, 2)):
    rng = np.random.default_rng(abs(hash(label)) % 2**32)
    base = rng.integers(0, 9, n) / 8
    ids = [f"p{i}" for i in range(n)]
    return Group(
        label,
        reward,
        None,
        {s: pd.Series(np.clip(base * 0 + 0.3 + per_seed_shift[i], 0, 1), index=ids) for i, s in enumerate(seeds)},
        final_val,
    )


def test_ordering_verdicts_say_how_sure_they_are():
    good = _group("PowerOPD α=5", "power", [0.2, 0.2, 0.2], 0.5)
    bad = _group("Vanilla", "vanilla", [0.0, 0.0, 0.0], 0.3)
    mixed = _group("+ Clip", "clip", [0.3, -0.1, 0.1], 0.4)
    assert compare("x", good, bad).verdict.startswith("holds (every seed")
    assert compare("x", bad, good).verdict.startswith("reversed")
    o = compare("x", mixed, bad)
    assert o.seeds_holding == 2 and o.seeds == 3 and "holds on average" in o.verdict
    assert Ordering("x", "a", "b", 0.1, -1.0, 1.0, 3, 3).verdict.startswith("not resolved")


def test_the_best_power_alpha_is_chosen_by_validation_not_by_test():
    val_best = _group("PowerOPD α=1", "power", [0.0, 0.0, 0.0], 0.9)  # best validation, worse test
    test_best = _group("PowerOPD α=50", "power", [0.3, 0.3, 0.3], 0.1)
    vanilla = _group("Vanilla", "vanilla", [0.1, 0.1, 0.1], 0.2)
    claims = ordering_claims({g.label: g for g in (val_best, test_best, vanilla)})
    (vs_vanilla,) = [c for c in claims if c.claim == "PowerOPD > Vanilla"]
    assert vs_vanilla.a == "PowerOPD α=1" and vs_vanilla.verdict.startswith("reversed")


@pytest.mark.e2e
def test_the_micro_study_runs_end_to_end(tmp_path, toy_cache):
    """sweeps/toy_study.py on the micro pair, shrunk to 2 x 2 calibration runs, 2 x 2 study
    runs and the sensitivity runs at 2 seeds (the beyond-the-paper stage left out: its sweep
    is composed in test_sweeps): calibration, the lr choice, training at that lr, evaluation,
    the report with its sensitivity table."""
    study, out = tmp_path / "study", tmp_path / "report"
    extra = [
        *MICRO_PAIR,
        *MICRO_TRAINING,
        "training.steps=2",
        "training.val_every=1",
        f"model_pair.cache_dir={toy_cache}",
    ]
    done = subprocess.run(
        [
            sys.executable,
            "sweeps/toy_study.py",
            "--study",
            str(study),
            "--out",
            str(out),
            "--calibration-methods=vanilla,power5",
            "--lrs=1e-4,1e-3",
            "--methods=vanilla,power5",
            "--seeds=0,1",
            "--no-beyond",
            "--eval-args=eval.n=2 eval.limit=8 eval.max_new_tokens=8",
            "--",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    chosen = json.loads((study / "calibration.json").read_text())["chosen_lr"]
    assert chosen in (1e-4, 1e-3)
    runs = sorted(p for p in (study / "runs").iterdir() if p.is_dir())
    assert len(runs) == 4 and len([p for p in (study / "calibration").iterdir() if p.is_dir()]) == 4
    for run in runs:
        assert json.loads((run / "run_config.json").read_text())["training"]["lr"] == chosen
        assert (run / "eval" / "toy" / "toy_test.samples.jsonl").is_file()
    text = (out / "report.md").read_text()
    assert "## Calibration" in text and "(chosen)" in text and "lr_robustness.png" in text
    assert "## Ordering claims on the test split" in text and "PowerOPD > Vanilla" in text
    assert (out / "figures" / "lr_robustness.png").is_file()
    numbers = json.loads((out / "study.json").read_text())
    assert numbers["chosen_lr"] == chosen and numbers["orderings"]
    authors = sorted(p.name for p in (study / "sensitivity").iterdir() if p.is_dir())
    assert len(authors) == 6 and {"tanh5", "clip5", "full_vocab_seqmean_keepstop"} == {
        name.split("_toy_")[1].rsplit("_seed", 1)[0] for name in authors
    }
    truncated = [p for p in (study / "sensitivity_truncated").iterdir() if p.is_dir()]
    assert len(truncated) == 4
    assert json.loads((truncated[0] / "run_config.json").read_text())["training"]["top_k"] == 20
    assert "## Sensitivity" in text and "`sensitivity_truncated`" in text and "+ Tanh τ=5" in text
    assert {"claim", "study", "sensitivity", "sensitivity_truncated"} <= set(numbers["sensitivity"][0])


# ----------------------------------------------------------------------------------------
# Ordering claims in every report with two seeds, and the sensitivity table


def _toy_run(root, name, reward: dict, seed: int, acc: float, training: dict | None = None, n: int = 120):
    """A finished, evaluated run directory as run.py + evaluate.py leave it (what analysis reads):
    per-problem test samples whose accuracy is about `acc`."""
    import yaml

    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "model_pair": {"name": "toy", "kind": "toy"},
        "reward": {"normalize": "none", "loss_agg": "token_mean", "stop_token": "mask", **reward},
        "training": {"lr": 1e-4, "top_p": 1.0, "top_k": 0, **(training or {})},
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "run_config.json").write_text(json.dumps(config))
    lines = [{"step": s, "val/accuracy": acc} for s in (0, 10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "summary.json").write_text(json.dumps({"status": "finished"}))
    _samples(run, acc, seed, n)
    return run


def _samples(folder, acc: float, seed: int, n: int):
    rng = np.random.default_rng(seed + int(acc * 1000))
    (folder / "eval" / "toy").mkdir(parents=True)
    rows = [{"id": f"p{i}", "correct": float(rng.random() < acc)} for i in range(n) for _ in range(8)]
    (folder / "eval" / "toy" / "toy_test.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval" / "toy.json").write_text(json.dumps({"suite": "toy", "benchmarks": {}, "mean": {}}))


def _study_roots(tmp_path, seeds=(0, 1)):
    main = tmp_path / "runs"
    for seed in seeds:
        _toy_run(main, f"v{seed}", {"name": "vanilla"}, seed, 0.40)
        _toy_run(main, f"p{seed}", {"name": "power", "alpha": 5.0}, seed, 0.60)
        _toy_run(main, f"t{seed}", {"name": "tanh", "tau": 1.0}, seed, 0.45)
        _toy_run(main, f"f{seed}", {"name": "full_vocab"}, seed, 0.65)
    ref = tmp_path / "evals" / "toy_student"
    ref.mkdir(parents=True)
    _samples(ref, 0.2, 0, 120)
    return main, tmp_path / "evals"


def test_every_report_with_two_seeds_carries_the_ordering_claims(tmp_path):
    from analysis.load import load_runs
    from analysis.study import study_sections

    main, evals = _study_roots(tmp_path)
    text, numbers = study_sections(load_runs([main, evals]), [], tmp_path)  # no calibration
    assert "## Ordering claims on the test split" in text and "PowerOPD > Vanilla" in text
    assert "## Calibration" not in text
    claims = {o["claim"]: o for o in numbers["orderings"]}
    assert claims["PowerOPD > Vanilla"]["seeds"] == 2 and claims["PowerOPD > Vanilla"]["lo"] > 0
    one_seed = tmp_path / "one"
    main1, evals1 = _study_roots(one_seed, seeds=(0,))
    text1, numbers1 = study_sections(load_runs([main1, evals1]), [], tmp_path)
    assert "Ordering claims" not in text1 and "orderings" not in numbers1  # one seed: no every-seed verdict


def test_the_sensitivity_table_makes_each_claim_again_and_marks_what_changes(tmp_path):
    from analysis.load import load_runs
    from analysis.study import study_sections

    main, evals = _study_roots(tmp_path)
    authors, truncated = tmp_path / "sensitivity", tmp_path / "sensitivity_truncated"
    for seed in (0, 1):
        # the authors' tanh is far better here: "PowerOPD > best post-hoc baseline" turns around
        _toy_run(authors, f"t{seed}", {"name": "tanh", "tau": 5.0}, seed, 0.80)
        _toy_run(truncated, f"v{seed}", {"name": "vanilla"}, seed, 0.50, {"top_p": 0.95, "top_k": 20})
        _toy_run(truncated, f"p{seed}", {"name": "power", "alpha": 5.0}, seed, 0.52, {"top_p": 0.95, "top_k": 20})
    text, numbers = study_sections(load_runs([main, evals]), [], tmp_path, [authors, truncated])
    assert "## Sensitivity" in text
    assert "+ Tanh τ=5: reward.tau 1 → 5\n" in text  # the only difference
    assert "training.top_k 0 → 20, training.top_p 1 → 0.95" in text
    rows = {r["claim"]: r for r in numbers["sensitivity"]}
    best = rows["PowerOPD > best post-hoc baseline (by validation)"]
    assert best["study"]["b"] == "+ Tanh" and best["study"]["lo"] > 0
    assert best["sensitivity"]["b"] == "+ Tanh τ=5" and best["sensitivity"]["hi"] < 0
    assert "(changed)" in text and "`sensitivity`: PowerOPD > best post-hoc baseline (by validation)." in text
    # a claim made with the variant's row is the study's claim of the row it stands for
    tanh = rows["+ Tanh > Vanilla"]
    assert tanh["study"]["a"] == "+ Tanh" and tanh["sensitivity"]["a"] == "+ Tanh τ=5"
    assert "(+ Tanh τ=5 vs Vanilla)" in text and "+ Tanh τ=5 > Vanilla" not in rows
    # truncated sampling changes training settings: its rows meet only each other and the references
    assert best["sensitivity_truncated"] is None
    vs = rows["PowerOPD > Vanilla"]["sensitivity_truncated"]
    assert vs["a"] == "PowerOPD α=5" and vs["b"] == "Vanilla" and vs["hi"] < 20  # its own, closer rows
    assert rows["Full-vocab improves on the untrained student"]["sensitivity_truncated"] is None
