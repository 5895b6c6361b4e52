"""Fig 5: reward magnitude over the joint probability space (pi_T, pi_theta) -- analytic.

Needs no runs and no model (and imports no torch):

    python -m analysis.heatmaps [--out figures] [--alphas 0.1 1 5 50 500] [--resolution 200]

Panel (a) is the log-ratio |log pi_T - log pi_theta|: it depends only on the ratio of the
two probabilities (constant along rays from the origin) and grows without bound as either
approaches 0. Panels (b...) are PowerOPD's |pi_T^alpha - pi_theta^alpha| for each alpha:
bounded by max(pi_T, pi_theta)^alpha, so as alpha grows the region where both probabilities
are small turns inert and the signal concentrates where either model is confident.
A companion figure (fig5_heatmaps_beyond) shows the other sampled-token objectives' per-token
weights on the same square: + Clip, + Tanh, Box-Cox and the k1 / k2 / k3 direct losses.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the figure is only ever written to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

from analysis.figures import PAGE_WIDTH, PAPER_RC, power_reward, save_figure  # noqa: E402

DEFAULT_ALPHAS = (0.1, 1.0, 5.0, 50.0, 500.0)
PROB_MIN = 1e-4  # the log-ratio is infinite at probability 0: the grid starts just above it
LOG_RATIO_FLOOR = 1e-2  # |log-ratio| below this (the diagonal) shows as the floor colour on the log scale
CMAP = "magma"


def probability_grid(resolution: int = 200) -> np.ndarray:
    """`resolution` probabilities from `PROB_MIN` to 1 (evenly spaced, as the axes are linear)."""
    return np.linspace(PROB_MIN, 1.0, resolution)


def support_threshold(level: float, alpha: float) -> float:
    """The smallest max(pi_T, pi_theta) at which |pi_T^alpha - pi_theta^alpha| can reach
    `level` (the magnitude is at most max(pi_T, pi_theta)^alpha): level^(1/alpha)."""
    return float(level ** (1.0 / alpha))


def reward_magnitudes(
    alphas: Sequence[float] = DEFAULT_ALPHAS, resolution: int = 200
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The probability grid and, on it, |log pi_T - log pi_theta| ("log-ratio") and
    |pi_T^alpha - pi_theta^alpha| ("α=<alpha>") as arrays indexed [pi_T, pi_theta]."""
    p = probability_grid(resolution)
    log_pT, log_pS = np.meshgrid(np.log(p), np.log(p), indexing="ij")  # rows: teacher, columns: student
    out = {"log-ratio": np.abs(log_pT - log_pS)}
    for alpha in alphas:
        out[f"α={alpha:g}"] = np.abs(power_reward(log_pT, log_pS, alpha))
    return p, out


def _frame_panel(fig, ax, image, title: str) -> None:
    """Title, the unit square and a colour bar: what every heatmap panel shares."""
    ax.set_title(title, loc="left")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    colorbar.ax.tick_params(labelsize=6)


def _label_axes(axes) -> None:
    for ax in axes[-1, :]:
        ax.set_xlabel(r"student $\pi_\theta$")
    for ax in axes[:, 0]:
        ax.set_ylabel(r"teacher $\pi_T$")


def fig5_heatmaps(
    out_dir: str | Path,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    resolution: int = 200,
    name: str = "fig5_heatmaps",
) -> list[Path]:
    """Fig 5: heatmaps of the reward magnitude over (pi_theta on x, pi_T on y) in [0, 1]^2.

    Reads nothing (analytic). Panel (a): |log pi_T - log pi_theta| on a log colour scale
    (clipped below at `LOG_RATIO_FLOOR`), so the blow-up near either axis is visible; the
    grid starts at `PROB_MIN` because the log-ratio is infinite at 0. One panel per alpha:
    |pi_T^alpha - pi_theta^alpha| on a shared linear [0, 1] colour scale. White contours
    mark fixed magnitudes; panels whose signal is confined near the border (large alpha) print
    the max(pi_T, pi_theta) above which |r| can reach 0.05. Saves PNG and PDF, returns the paths.
    """
    if resolution < 2:
        return []
    alphas = list(dict.fromkeys(float(a) for a in alphas))  # a repeated alpha would only repeat a panel
    p, mags = reward_magnitudes(alphas, resolution)
    panels: list[tuple[str, float | None]] = [("log-ratio", None)] + [(f"α={a:g}", a) for a in alphas]
    n = len(panels)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    extent = (float(p[0]), float(p[-1]), float(p[0]), float(p[-1]))
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(PAGE_WIDTH, 2.1 * nrows + 0.1),
            layout="constrained",
            sharex=True,
            sharey=True,
            squeeze=False,
        )
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for i, (ax, (key, alpha)) in enumerate(zip(axes.flat, panels)):
            letter, mag = chr(ord("a") + i), mags[key]
            if alpha is None:
                norm: Normalize = LogNorm(vmin=LOG_RATIO_FLOOR, vmax=float(mag.max()), clip=True)
                levels = [0.5, 2.0, 5.0]
                title = rf"({letter}) $|\log\pi_T - \log\pi_\theta|$"
            else:
                norm = Normalize(vmin=0.0, vmax=1.0)  # one scale for every alpha, so panels compare
                levels = [0.05, 0.25, 0.5]
                title = rf"({letter}) $|\pi_T^\alpha - \pi_\theta^\alpha|$, {key}"
            image = ax.imshow(
                np.maximum(mag, LOG_RATIO_FLOOR) if alpha is None else mag,
                origin="lower",
                extent=extent,
                cmap=CMAP,
                norm=norm,
                aspect="equal",
                interpolation="nearest",
            )
            contours = ax.contour(p, p, mag, levels=levels, colors="white", linewidths=0.5, alpha=0.8)
            edge = 0.0 if alpha is None else support_threshold(levels[0], alpha)
            if edge < 0.9:  # labels of contours squeezed against the border would only overprint
                ax.clabel(contours, fontsize=5, fmt="%g", inline=True)
            if edge >= 0.5:
                # At large alpha the signal lives in a strip too thin to see: print where it starts
                # (in the inert lower-left corner, which is dark exactly when this applies).
                ax.text(
                    0.03,
                    0.04,
                    f"|r| ≥ {levels[0]:g} needs\nmax(π) ≥ {edge:.3g}",
                    transform=ax.transAxes,
                    color="white",
                    fontsize=6,
                    va="bottom",
                )
            _frame_panel(fig, ax, image, title)
            ax.spines[["top", "right"]].set_visible(True)
        _label_axes(axes)
        return save_figure(fig, out_dir, name)


def sampled_token_weights(resolution: int = 200, alpha: float = 5.0, tau: float = 1.0) -> tuple[np.ndarray, dict]:
    """|per-token weight on grad log pi_theta(token)| of the sampled-token objectives besides
    the paper's two, on the same grid: the post-hoc baselines (+ Clip at [-1, 1], + Tanh at
    tau), Box-Cox (PowerOPD / alpha), and the k1 / k2 / k3 estimators as direct losses, whose
    weight is -dk/d log pi_theta (k1: 1 everywhere, k2: the log-ratio, k3: pi_T / pi_theta - 1,
    unbounded as pi_theta -> 0: the forward KL's mass-covering pull)."""
    p = probability_grid(resolution)
    log_pT, log_pS = np.meshgrid(np.log(p), np.log(p), indexing="ij")
    log_r = log_pT - log_pS
    out = {
        "+ Clip [-1, 1]": np.abs(np.clip(log_r, -1.0, 1.0)),
        f"+ Tanh τ={tau:g}": np.abs(np.tanh(log_r / tau)),
        f"Box-Cox α={alpha:g}": np.abs(power_reward(log_pT, log_pS, alpha)) / alpha,
        "KL k1 loss": np.ones_like(log_r),
        "KL k2 loss": np.abs(log_r),
        "KL k3 loss": np.abs(np.expm1(log_r)),
    }
    return p, out


def fig5_sampled_token_heatmaps(
    out_dir: str | Path, resolution: int = 200, alpha: float = 5.0, name: str = "fig5_heatmaps_beyond"
) -> list[Path]:
    """Fig 5's companion: the same (pi_theta, pi_T) square for the other sampled-token
    objectives (`sampled_token_weights`). Bounded weights on a linear scale from 0 to their
    maximum, unbounded ones (k2, k3) on a log scale, as panel (a) of Fig 5."""
    if resolution < 2:
        return []
    p, mags = sampled_token_weights(resolution, alpha)
    extent = (float(p[0]), float(p[-1]), float(p[0]), float(p[-1]))
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            2, 3, figsize=(PAGE_WIDTH, 4.3), layout="constrained", sharex=True, sharey=True, squeeze=False
        )
        for i, (ax, (key, mag)) in enumerate(zip(axes.flat, mags.items())):
            unbounded = key in ("KL k2 loss", "KL k3 loss")
            if unbounded:
                norm: Normalize = LogNorm(vmin=LOG_RATIO_FLOOR, vmax=float(mag.max()), clip=True)
                shown = np.maximum(mag, LOG_RATIO_FLOOR)
            else:
                norm = Normalize(vmin=0.0, vmax=max(float(mag.max()), 1e-12))
                shown = mag
            image = ax.imshow(
                shown, origin="lower", extent=extent, cmap=CMAP, norm=norm, aspect="equal", interpolation="nearest"
            )
            _frame_panel(fig, ax, image, f"({chr(ord('a') + i)}) {key}")
        _label_axes(axes)
        return save_figure(fig, out_dir, name)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="figures", help="output folder (default: ./figures)")
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="PowerOPD alphas, one panel each"
    )
    parser.add_argument("--resolution", type=int, default=200, help="grid points per axis")
    parser.add_argument("--name", default="fig5_heatmaps", help="file name without extension")
    args = parser.parse_args(argv)
    if any(a <= 0 for a in args.alphas):
        parser.error("alphas must be > 0")
    if args.resolution < 2:
        parser.error("--resolution must be >= 2")
    paths = fig5_heatmaps(args.out, alphas=args.alphas, resolution=args.resolution, name=args.name)
    paths += fig5_sampled_token_heatmaps(args.out, resolution=args.resolution)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
