"""Token-level OPD rewards: small pure functions of the sampled token's log-probs.

Each reward maps (lT_BT, lS_BT, mask_BT, cfg) to r_BT, where lT / lS are the teacher's /
student's fp32 log-probs of the sampled token (full-vocabulary log-softmax at temperature
1) and r is zero outside `mask_BT`. Rewards are always computed from detached log-probs:
the trainer multiplies them into the loss as stop-gradient weights (REFERENCE.md s.1-2).

    vanilla   r = lT - lS                                 unbounded log-ratio
    clip      r = clamp(lT - lS, c_l, c_h)                 post-hoc bound
    tanh      r = tanh((lT - lS) / tau)                    post-hoc squashing
    zscore    r = lT - lS, then z-scored over the batch    (normalize=zscore)
    power     r = pi_T^alpha - pi_theta^alpha = exp(alpha lT) - exp(alpha lS) in [-1, 1]

PowerOPD drops the Box-Cox 1/alpha factor (absorbed into the learning rate), so
(x^alpha - 1)/alpha -> log x as alpha -> 0 relates `power` to `vanilla` only up to that
factor. The full-vocab baseline is not a reward but a loss (see losses.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from poweropd.config import RewardConfig

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RewardConfig], torch.Tensor]


def log_ratio(lT_BT, lS_BT, mask_BT, cfg: RewardConfig) -> torch.Tensor:
    return (lT_BT - lS_BT) * mask_BT


def clipped_log_ratio(lT_BT, lS_BT, mask_BT, cfg: RewardConfig) -> torch.Tensor:
    return (lT_BT - lS_BT).clamp(cfg.clip_low, cfg.clip_high) * mask_BT


def tanh_log_ratio(lT_BT, lS_BT, mask_BT, cfg: RewardConfig) -> torch.Tensor:
    return torch.tanh((lT_BT - lS_BT) / cfg.tau) * mask_BT


def power(lT_BT, lS_BT, mask_BT, cfg: RewardConfig) -> torch.Tensor:
    # exp of a non-positive fp32 log-prob times alpha: always in [0, 1], no overflow.
    lT, lS = lT_BT.float(), lS_BT.float()
    return (torch.exp(cfg.alpha * lT) - torch.exp(cfg.alpha * lS)) * mask_BT


REWARDS: dict[str, RewardFn] = {
    "vanilla": log_ratio,
    "clip": clipped_log_ratio,
    "tanh": tanh_log_ratio,
    "zscore": log_ratio,  # the z-score baseline normalises the log-ratio (normalize=zscore)
    "power": power,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)} (and full_vocab, a loss)")
    return REWARDS[name]


def masked_moments(r_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] over valid tokens (all-reduce these across processes)."""
    # float64: a sum of squares over ~1e5 tokens with |r| ~ 50 loses digits in fp32.
    r = r_BT.double() * mask_BT
    return torch.stack([mask_BT.double().sum(), r.sum(), (r * r).sum()])


def zscore(r_BT: torch.Tensor, mask_BT: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """(r - mu_B) / max(sigma_B, 1e-8), mu and population sigma over ALL valid tokens of the
    update batch (`moments` from `masked_moments`, summed over micro-batches and processes)."""
    count, total, total_sq = moments.unbind()
    count = count.clamp(min=1.0)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp(min=0.0)
    return ((r_BT - mean) / var.sqrt().clamp(min=1e-8) * mask_BT).to(r_BT.dtype)
