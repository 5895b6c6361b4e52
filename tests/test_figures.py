"""analysis.figures / analysis.heatmaps on synthetic runs: every figure is written as PNG and
PDF, empty input writes nothing, and the numbers behind Figs 2a / 2b / 5 are right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures, heatmaps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
METHODS = [("vanilla", 0.0, "Vanilla"), ("clip", 0.0, "+ Clip"), ("power", 500.0, "PowerOPD α=500")]
EXTRA_ALPHAS = [("power", 5.0, "PowerOPD α=5")]


def synthetic_runs(methods=METHODS, seeds=(0, 1), steps: int = STEPS, val_every: int = 5):
    """runs / curves in the loader's schema: every method x seed, `steps` training steps."""
    rng = np.random.default_rng(0)
    runs, rows = [], []
    for k, (name, alpha, label) in enumerate(methods):
        for seed in seeds:
            run_id = f"{name}{alpha:g}_s{seed}"
            runs.append(
                {
                    "run_id": run_id,
                    "run_dir": f"/nonexistent/{run_id}",
                    "finished": True,
                    "kind": "run",
                    "method": label,
                    "group": f"{name}{alpha:g}",
                    "label": label,
                    "reward.name": name,
                    "reward.alpha": alpha,
                    "seed": seed,
                }
            )
            # Vanilla's log-ratio has a heavy tail; PowerOPD's reward is bounded.
            tail = 40.0 if name != "power" else 1.0
            for step in range(1, steps + 1):
                stats = {
                    "grad_norm": (1e3 / step if name == "vanilla" else 0.3) * (1 + 0.1 * rng.random()),
                    "response_length": 200.0 + 10 * step + seed,
                    "log_ratio/min": -tail - rng.random(),
                    "log_ratio/max": 5.0 + rng.random(),
                    "log_ratio/p5": -0.8,
                    "log_ratio/p95": 0.3,
                    "log_ratio/mean": -0.1,
                    "reward/min": -1.0 if name != "vanilla" else -tail,
                    "reward/max": 1.0,
                    "reward/p5": -0.5,
                    "reward/p95": 0.2,
                    "entropy/mean": 2.0 - 0.01 * step + 0.1 * seed,
                }
                if name != "full_vocab":  # a divergence has no per-token reward
                    stats["reward/frac_above_0.01"] = 0.3 if name == "power" else 0.9
                rows += [(run_id, step, metric, value) for metric, value in stats.items()]
            for step in range(0, steps + 1, val_every):
                # methods differ (k), seeds differ a little: lines and bands are both visible
                rows.append((run_id, step, "val/accuracy", 0.3 + 0.002 * step * (1 + k) + 0.02 * seed))
                rows.append((run_id, step, "val/response_length", 400.0 - 1.5 * step * k + 10 * seed))
    curves = pd.DataFrame(rows, columns=["run_id", "step", "metric", "value"])
    return pd.DataFrame(runs), curves


def synthetic_dump(n_rollouts: int = 8, length: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """A reward dump whose rollouts get shorter and shorter (so late positions have few
    tokens) and whose teacher sometimes assigns a token almost no probability (the tail)."""
    rng = np.random.default_rng(seed)
    rollout, position = [], []
    for r in range(n_rollouts):
        n = length - 6 * r
        rollout += [r] * n
        position += list(range(n))
    size = len(position)
    student = -np.abs(rng.normal(0.0, 0.5, size))
    teacher = -np.abs(rng.normal(0.0, 1.0, size))
    teacher[rng.random(size) < 0.02] = -48.0  # the heavy negative tail near -50
    log_ratio = teacher - student
    return {
        "rollout": np.array(rollout),
        "position": np.array(position),
        "token_id": rng.integers(0, 100, size),
        "teacher_logprob": teacher,
        "student_logprob": student,
        "log_ratio": log_ratio,
        "reward": np.clip(log_ratio, -1.0, 1.0),
    }


def assert_written(paths: list[Path], out: Path, name: str) -> None:
    assert sorted(paths) == sorted([out / f"{name}.png", out / f"{name}.pdf"])
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000, path
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


# ----------------------------------------------------------------------------------------
# Pure helpers


def test_power_reward_is_bounded_and_matches_the_formula():
    values = np.array([-1e4, -300.0, -50.0, -5.0, -1.0, -0.3, -1e-3, 0.0])
    lT, lS = (a.ravel() for a in np.meshgrid(values, values, indexing="ij"))
    for alpha in (0.1, 1.0, 5.0, 50.0, 500.0):
        r = figures.power_reward(lT, lS, alpha)
        assert np.isfinite(r).all()
        assert r.min() >= -1.0 and r.max() <= 1.0
        np.testing.assert_allclose(r, np.exp(alpha * lT) - np.exp(alpha * lS), rtol=0, atol=1e-12)
        # the probability form pi_T^alpha - pi_theta^alpha, and P2: the sign of the log-ratio
        np.testing.assert_allclose(r, np.exp(lT) ** alpha - np.exp(lS) ** alpha, atol=1e-9)
        differs = np.abs(r) > 1e-12
        assert (np.sign(r[differs]) == np.sign((lT - lS)[differs])).all()
    # the bound is attained: teacher certain, student never samples it
    assert figures.power_reward(0.0, -1e7, 5.0) == pytest.approx(1.0)


def test_position_stats_by_hand_and_min_count_filter():
    dump = {
        "position": np.array([0, 0, 0, 1, 1, 1, 2]),
        "log_ratio": np.array([-10.0, 2.0, 5.0, 1.0, -1.0, 3.0, -40.0]),
        "reward": np.array([-1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0]),
    }
    stats = figures.position_stats(dump, min_count=2)
    assert stats["position"].tolist() == [0, 1]  # position 2 has one token: dropped
    assert stats["count"].tolist() == [3, 3]
    assert stats["log_ratio_mean"].tolist() == pytest.approx([-1.0, 1.0])
    assert stats["log_ratio_min"].tolist() == [-10.0, -1.0]
    assert stats["log_ratio_max"].tolist() == [5.0, 3.0]
    assert stats["reward_mean"].tolist() == pytest.approx([1 / 3, 1 / 3])
    kept = figures.position_stats(dump, min_count=1)
    assert kept["position"].tolist() == [0, 1, 2] and kept["log_ratio_min"].tolist()[-1] == -40.0
    # without `log_ratio` the dump's log-probs give it
    derived = figures.position_stats({"position": np.array([3, 3]), "teacher_logprob": np.array([-5.0, -1.0]),
                                      "student_logprob": np.array([-1.0, -1.0])}, min_count=1)  # fmt: skip
    assert derived["log_ratio_mean"].tolist() == [-2.0] and "reward_mean" not in derived


def test_synthetic_dump_positions_are_filtered():
    dump = synthetic_dump()
    counts = np.bincount(dump["position"])
    stats = figures.position_stats(dump, min_count=5)
    assert stats["position"].tolist() == [p for p, c in enumerate(counts) if c >= 5]
    assert len(stats) < len(counts)


def test_group_curves_mean_and_band_over_seeds():
    runs = pd.DataFrame(
        {"run_id": ["a", "b", "c"], "method": ["Vanilla", "Vanilla", "PowerOPD α=5"], "group": ["v", "v", "p"]}
    )
    curves = pd.DataFrame(
        [
            ("a", 1, "grad_norm", 2.0),
            ("b", 1, "grad_norm", 4.0),
            ("a", 2, "grad_norm", 6.0),
            ("c", 1, "grad_norm", 1.0),
        ],
        columns=["run_id", "step", "metric", "value"],
    )
    groups = figures.group_curves(runs, curves, "grad_norm")
    assert [g.label for g in groups] == ["Vanilla", "PowerOPD α=5"]
    vanilla = groups[0]
    assert vanilla.n_runs == 2
    assert vanilla.frame["mean"].tolist() == [3.0, 6.0]  # step 2: only run a has it
    assert vanilla.frame["lo"].tolist() == [2.0, 6.0] and vanilla.frame["hi"].tolist() == [4.0, 6.0]
    assert vanilla.frame["n"].tolist() == [2, 1]
    # PowerOPD logged step 1 only: no step 2 (not a zero, not a NaN) in its curve
    assert groups[1].frame.index.tolist() == [1] and groups[1].frame["mean"].tolist() == [1.0]
    assert figures.group_curves(runs, curves, "val/accuracy") == []


def test_method_colors_are_stable_and_distinct():
    labels = ["Full-vocab", "Vanilla", "+ Clip", "+ Tanh", "+ Z-Score", "PowerOPD α=0.1", "PowerOPD α=500"]
    colors = figures.method_colors(labels)
    assert len({repr(c) for c in colors.values()}) == len(labels)
    # an alpha's colour does not depend on which other methods a figure shows
    assert colors["PowerOPD α=500"] == figures.method_colors(["PowerOPD α=500"])["PowerOPD α=500"]
    assert colors["Vanilla"] == figures.method_colors(["Vanilla (training.lr=1e-05)"])["Vanilla (training.lr=1e-05)"]
    assert figures.label_alpha("PowerOPD α=0.5") == 0.5 and figures.label_alpha("Vanilla") is None
    order = sorted(["PowerOPD α=500", "+ Clip", "PowerOPD α=5", "Full-vocab"], key=figures.method_sort_key)
    assert order == ["Full-vocab", "+ Clip", "PowerOPD α=5", "PowerOPD α=500"]


def test_symlog_only_when_extremes_dwarf_the_band():
    assert figures.symlog_threshold(np.array([-48.0, 6.0]), np.array([-0.8, 0.3])) is not None
    assert figures.symlog_threshold(np.array([-1.0, 1.0]), np.array([-0.5, 0.2])) is None


# ----------------------------------------------------------------------------------------
# Every figure: written on data, nothing on empty input


@pytest.mark.e2e
def test_fig2a_and_fig2b_write_png_and_pdf(tmp_path):
    dump = synthetic_dump()
    assert_written(
        figures.fig2a_reward_histogram(dump, tmp_path, alphas=(1.0, 5.0, 50.0)), tmp_path, "fig2a_reward_histogram"
    )
    assert_written(figures.fig2b_position_extremes(dump, tmp_path, min_count=5), tmp_path, "fig2b_position_extremes")
    # a full_vocab dump: no `reward`, only log-probs
    no_reward = {k: v for k, v in dump.items() if k not in ("reward", "log_ratio")}
    assert_written(figures.fig2b_position_extremes(no_reward, tmp_path, min_count=5, name="b2"), tmp_path, "b2")
    assert_written(figures.fig2a_reward_histogram(no_reward, tmp_path, name="a2"), tmp_path, "a2")


@pytest.mark.e2e
def test_fig2c_fig3_fig4_fig6_write_png_and_pdf(tmp_path):
    runs, curves = synthetic_runs(METHODS + EXTRA_ALPHAS)
    assert_written(figures.fig2c_reward_band(runs, curves, tmp_path), tmp_path, "fig2c_reward_band")
    paths = figures.fig2c_reward_band(runs, curves, tmp_path, metric_prefix="reward", name="fig2c_reward", sharey=False)
    assert_written(paths, tmp_path, "fig2c_reward")
    assert_written(figures.fig3_accuracy_length(runs, curves, tmp_path), tmp_path, "fig3_accuracy_length")
    paths = figures.fig3_accuracy_length(runs, curves, tmp_path, name="fig3_sel", methods=["Vanilla", "PowerOPD α=500"])
    assert_written(paths, tmp_path, "fig3_sel")
    assert_written(figures.fig4_alpha_sweep(runs, curves, tmp_path), tmp_path, "fig4_alpha_sweep")
    paths = figures.fig4_alpha_sweep(runs, curves, tmp_path, name="fig4_ref", baselines=["Vanilla"])
    assert_written(paths, tmp_path, "fig4_ref")
    assert_written(figures.fig6_grad_norm(runs, curves, tmp_path), tmp_path, "fig6_grad_norm")
    assert_written(figures.fig6_grad_norm(runs, curves, tmp_path, smooth=3, name="fig6_s"), tmp_path, "fig6_s")


def test_single_seed_and_training_length_fallback(tmp_path):
    runs, curves = synthetic_runs(METHODS[:1], seeds=(0,))
    curves = curves[curves["metric"] != "val/response_length"]
    assert_written(figures.fig3_accuracy_length(runs, curves, tmp_path), tmp_path, "fig3_accuracy_length")


def test_empty_input_writes_nothing(tmp_path):
    runs, curves = synthetic_runs()
    empty_runs, empty_curves = runs.iloc[0:0], curves.iloc[0:0]
    out = tmp_path / "out"
    for fn in (
        figures.fig2c_reward_band,
        figures.fig3_accuracy_length,
        figures.fig4_alpha_sweep,
        figures.fig6_grad_norm,
    ):
        assert fn(empty_runs, curves, out) == []
        assert fn(runs, empty_curves, out) == []
        assert fn(pd.DataFrame(), pd.DataFrame(), out) == []
    # no PowerOPD runs -> no alpha sweep; a selection that matches nothing -> no Fig 3
    baselines = runs[runs["reward.name"] != "power"]
    assert figures.fig4_alpha_sweep(baselines, curves, out) == []
    assert figures.fig4_alpha_sweep(baselines, curves, out, baselines=["Vanilla"]) == []  # references alone
    assert figures.fig3_accuracy_length(runs, curves, out, methods=["+ Tanh"]) == []
    for fn in (figures.fig2a_reward_histogram, figures.fig2b_position_extremes):
        assert fn({}, out) == []
        assert fn(None, out) == []
        assert fn({"position": np.array([], int), "log_ratio": np.array([])}, out) == []
    # every position below min_count
    assert figures.fig2b_position_extremes(synthetic_dump(), out, min_count=10**6) == []
    assert figures.fig_position_over_training(tmp_path / "missing", out) == []
    assert not out.exists() or not any(out.iterdir())


def test_position_over_training(tmp_path):
    lines = [
        {"step": s, "position": [0, 1, 2], "count": [8, 8, 1], "log_ratio_mean": [-1.0, 0.0, 0.0],
         "log_ratio_min": [-40.0 / s, -2.0, -9.0], "log_ratio_max": [3.0, 1.0, 9.0]}
        for s in (2, 4, 6)
    ]  # fmt: skip
    (tmp_path / "positions.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{partial")
    assert len(figures.read_positions(tmp_path)) == 3
    out = tmp_path / "figs"
    assert_written(figures.fig_position_over_training(tmp_path, out, min_count=5), out, "fig_position_over_training")
    assert figures.fig_position_over_training(tmp_path, out, value="reward", name="none") == []


# ----------------------------------------------------------------------------------------
# Fig 5 (analytic)


def test_heatmap_magnitudes():
    p, mags = heatmaps.reward_magnitudes(alphas=(1.0, 50.0), resolution=11)
    assert p[0] > 0 and p[-1] == 1.0
    assert set(mags) == {"log-ratio", "α=1", "α=50"}
    # rows: teacher pi_T, columns: student pi_theta
    np.testing.assert_allclose(mags["log-ratio"][3, 7], abs(np.log(p[3]) - np.log(p[7])))
    np.testing.assert_allclose(mags["α=1"], np.abs(p[:, None] - p[None, :]), atol=1e-12)
    assert mags["α=50"].max() <= 1.0 and np.all(np.diag(mags["log-ratio"]) == 0)
    # larger alpha: the inert region grows (here: the magnitude at pi = 0.5 vs 0.1 shrinks)
    i, j = np.argmin(abs(p - 0.5)), np.argmin(abs(p - 0.1))
    assert mags["α=50"][i, j] < mags["α=1"][i, j]
    assert heatmaps.support_threshold(0.05, 500.0) == pytest.approx(0.05 ** (1 / 500))


def test_sampled_token_weights_of_the_other_objectives():
    p, mags = heatmaps.sampled_token_weights(resolution=21, alpha=5.0)
    log_r = np.log(p)[:, None] - np.log(p)[None, :]
    np.testing.assert_allclose(mags["KL k3 loss"], np.abs(np.exp(log_r) - 1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mags["KL k2 loss"], np.abs(log_r), atol=1e-12)
    assert (mags["KL k1 loss"] == 1).all()
    assert mags["+ Clip [-1, 1]"].max() <= 1 and mags["Box-Cox α=5"].max() <= 1 / 5
    assert mags["KL k3 loss"][-1, 0] > 1e3  # unbounded where the teacher is sure and the student is not


@pytest.mark.e2e
def test_fig5_sampled_token_heatmaps(tmp_path):
    assert_written(heatmaps.fig5_sampled_token_heatmaps(tmp_path, resolution=30), tmp_path, "fig5_heatmaps_beyond")


@pytest.mark.e2e
def test_fig5_heatmaps(tmp_path):
    assert_written(heatmaps.fig5_heatmaps(tmp_path, alphas=(0.1, 5.0), resolution=40), tmp_path, "fig5_heatmaps")


@pytest.mark.e2e
def test_heatmap_cli_without_torch(tmp_path):
    out = tmp_path / "figs"
    cmd = [sys.executable, "-m", "analysis.heatmaps", "--out", str(out), "--alphas", "1", "500", "--resolution", "50"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split()
    assert printed == [
        str(out / f"{name}.{ext}") for name in ("fig5_heatmaps", "fig5_heatmaps_beyond") for ext in ("png", "pdf")
    ]
    assert all(Path(p).stat().st_size > 1000 for p in printed)
    bad = subprocess.run([*cmd[:3], "--alphas", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    probe = "import sys, analysis.heatmaps, analysis.figures; print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert imported.stdout.strip() == "False", imported.stderr


# ----------------------------------------------------------------------------------------
# What the figures show: series, labels, axis scales and the numbers behind the lines


@pytest.fixture
def shown(monkeypatch):
    """Every figure handed to save_figure, by name (kept open for inspection)."""
    drawn = {}
    original = figures.save_figure

    def keep(fig, out_dir, name):
        drawn[name] = fig
        paths = original(fig, out_dir, name)
        return paths

    monkeypatch.setattr(figures, "save_figure", keep)
    monkeypatch.setattr(figures.plt, "close", lambda *a: None)  # keep the figure alive for the asserts
    yield drawn
    matplotlib.pyplot.close("all")


def lines_of(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_fig3_shows_each_methods_seed_mean_accuracy_in_table_order(tmp_path, shown):
    runs, curves = synthetic_runs(METHODS + EXTRA_ALPHAS)
    figures.fig3_accuracy_length(runs, curves, tmp_path)
    fig = shown["fig3_accuracy_length"]
    acc, length = fig.axes[:2]
    assert acc.get_ylabel() == "accuracy (%)" and acc.get_xlabel() == "training step"
    assert length.get_ylabel() == "tokens" and (acc.get_yscale(), length.get_yscale()) == ("linear", "linear")
    labels = ["Vanilla", "+ Clip", "PowerOPD α=5", "PowerOPD α=500"]
    assert list(lines_of(acc)) == labels == [t.get_text() for t in fig.legends[0].get_texts()]
    order = {"Vanilla": 0, "+ Clip": 1, "PowerOPD α=500": 2, "PowerOPD α=5": 3}  # k in synthetic_runs
    for label, line in lines_of(acc).items():
        x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert list(x) == [0, 5, 10, 15, 20]
        expected = 100 * (0.3 + 0.002 * x * (1 + order[label]) + 0.01)  # the mean of seeds 0 and 1, in %
        np.testing.assert_allclose(y, expected, rtol=1e-9)
    assert len(acc.collections) == 4  # one seed band per method


def test_fig6_is_the_pre_clip_norm_on_a_log_axis_and_vanilla_is_on_top(tmp_path, shown):
    runs, curves = synthetic_runs()
    figures.fig6_grad_norm(runs, curves, tmp_path)
    ax = shown["fig6_grad_norm"].axes[0]
    assert ax.get_yscale() == "log" and "pre-clip" in ax.get_ylabel()
    series = lines_of(ax)
    assert set(series) == {"Vanilla", "+ Clip", "PowerOPD α=500"}
    assert len(series["Vanilla"].get_xdata()) == STEPS
    assert min(series["Vanilla"].get_ydata()) > max(series["PowerOPD α=500"].get_ydata())


def test_fig6_diagnostics_put_entropy_and_the_rewarded_share_beside_the_grad_norm(tmp_path, shown):
    runs, curves = synthetic_runs()
    assert_written(figures.fig6_diagnostics(runs, curves, tmp_path, smooth=1), tmp_path, "fig6_diagnostics")
    grad, entropy, active = shown["fig6_diagnostics"].axes[:3]
    assert grad.get_yscale() == "log" and "entropy" in entropy.get_title(loc="left")
    assert "0.01" in active.get_title(loc="left")
    series = lines_of(entropy)
    assert set(series) == {"Vanilla", "+ Clip", "PowerOPD α=500"}
    np.testing.assert_allclose(series["Vanilla"].get_ydata(), 2.0 - 0.01 * np.arange(1, STEPS + 1) + 0.05)
    shares = {label: line.get_ydata() for label, line in lines_of(active).items()}
    np.testing.assert_allclose(shares["PowerOPD α=500"], 30.0)  # percent
    np.testing.assert_allclose(shares["Vanilla"], 90.0)
    # runs from before the diagnostics were logged: no figure
    old = curves[~curves["metric"].isin([figures.ENTROPY_METRIC, figures.ACTIVE_METRIC])]
    assert figures.fig6_diagnostics(runs, old, tmp_path) == []


def test_fig4_puts_alpha_on_a_log_axis(tmp_path, shown):
    runs, curves = synthetic_runs(METHODS + EXTRA_ALPHAS)
    figures.fig4_alpha_sweep(runs, curves, tmp_path)
    axes = shown["fig4_alpha_sweep"].axes
    over_alpha = [ax for ax in axes if ax.get_xlabel() == "α"]
    assert len(over_alpha) == 2 and all(ax.get_xscale() == "log" for ax in over_alpha)
    xs = {float(x) for ax in over_alpha for line in ax.get_lines() for x in line.get_xdata()}
    assert {5.0, 500.0} <= xs  # the two PowerOPD alphas of the runs


def test_fig2a_histograms_the_log_ratio_and_each_alphas_power_reward(tmp_path, shown):
    figures.fig2a_reward_histogram(synthetic_dump(), tmp_path, alphas=(1.0, 5.0))
    log_ax, power_ax = shown["fig2a_reward_histogram"].axes[:2]
    assert "log-ratio" in log_ax.get_xlabel() and log_ax.get_yscale() == "log"
    assert [t.get_text() for t in power_ax.get_legend().get_texts()] == ["α=1", "α=5"]
    lo, hi = power_ax.get_xlim()
    assert -1.05 <= lo and hi <= 1.05  # the power reward is bounded in [-1, 1]


def test_fig2c_bands_are_symlog_when_the_extremes_dwarf_the_band(tmp_path, shown):
    runs, curves = synthetic_runs()
    figures.fig2c_reward_band(runs, curves, tmp_path)
    fig = shown["fig2c_reward_band"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["p5-p95", "max", "min", "mean"]
    drawn = [ax for ax in fig.axes if ax.get_lines()]
    assert len(drawn) == 3 and all(ax.get_yscale() == "symlog" for ax in drawn)  # vanilla's tail reaches -40
