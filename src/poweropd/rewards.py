"""Token-level OPD rewards: small pure functions of the sampled token's log-probs.

Each reward maps (lT_BT, lS_BT, mask_BT, cfg) to r_BT, where lT / lS are the teacher's /
student's fp32 log-probs of the sampled token (full-vocabulary log-softmax at temperature
1), cfg is the run's RewardConfig (its knobs) and r is zero outside `mask_BT`. Rewards are
always computed from detached log-probs: the trainer multiplies them into the loss as
stop-gradient weights (docs/reference.md §1-2). Which reward belongs to which `reward=`
option is poweropd.objectives' registry.

    vanilla   r = lT - lS                                 unbounded log-ratio
    clip      r = clamp(lT - lS, c_l, c_h)                 post-hoc bound
    tanh      r = tanh((lT - lS) / tau)                    post-hoc squashing
    zscore    r = lT - lS, then z-scored over the batch    (normalize=zscore)
    power     r = pi_T^alpha - pi_theta^alpha = exp(alpha lT) - exp(alpha lS) in [-1, 1]
    box_cox   r = (pi_T^alpha - pi_theta^alpha) / alpha     power with the Box-Cox factor kept

Beyond the paper (docs/objectives.md has each one's anchor and command):
    kl_loss   a sampled-token KL estimator k1 / k2 / k3 back-propagated directly as a loss;
              its "reward" here is the per-token weight -dk/dlS the gradient puts on
              grad log pi_theta(token), so that heatmaps and statistics compare like with like
    gamma     reward-to-go A_t = sum_{t' >= t} gamma^(t' - t) r_t' over the rollout
    task      a verifiable reward R of the finished rollout, mixed in with task_weight
              (a sequence-level advantage, or the terminal reward under a discount)

PowerOPD drops the Box-Cox 1/alpha factor (absorbed into the learning rate), so
(x^alpha - 1)/alpha -> log x as alpha -> 0 relates `power` to `vanilla` only up to that
factor. The full-vocab baseline is not a reward but a loss (poweropd.objectives.full_vocab).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def log_ratio(lT_BT, lS_BT, mask_BT, cfg) -> torch.Tensor:
    return (lT_BT - lS_BT) * mask_BT


def clipped_log_ratio(lT_BT, lS_BT, mask_BT, cfg) -> torch.Tensor:
    return (lT_BT - lS_BT).clamp(cfg.clip_low, cfg.clip_high) * mask_BT


def tanh_log_ratio(lT_BT, lS_BT, mask_BT, cfg) -> torch.Tensor:
    return torch.tanh((lT_BT - lS_BT) / cfg.tau) * mask_BT


def power(lT_BT, lS_BT, mask_BT, cfg) -> torch.Tensor:
    # exp of a non-positive fp32 log-prob times alpha: always in [0, 1], no overflow.
    lT, lS = lT_BT.float(), lS_BT.float()
    return (torch.exp(cfg.alpha * lT) - torch.exp(cfg.alpha * lS)) * mask_BT


def box_cox(lT_BT, lS_BT, mask_BT, cfg) -> torch.Tensor:
    """(pi_T^alpha - pi_theta^alpha) / alpha: the Box-Cox transform of both probabilities,
    (x^alpha - 1) / alpha, differenced. It is `power` divided by alpha, so its update is
    PowerOPD's at learning rate lr / alpha; as alpha -> 0 it tends to the log-ratio."""
    return power(lT_BT, lS_BT, mask_BT, cfg) / cfg.alpha


# ----------------------------------------------------------------------------------------
# Sampled-token KL estimators (Schulman's k1, k2, k3) used as a loss, not as a reward.
#
# With x ~ pi_theta and log r = lT - lS, all three estimate KL(pi_theta || pi_T):
#     k1 = -log r = lS - lT          unbiased, can be negative
#     k2 = (log r)^2 / 2             biased, >= 0
#     k3 = (r - 1) - log r           unbiased, >= 0 (r - 1 >= log r)
# Back-propagated directly through lS (teacher and the sampling distribution held fixed),
# each gives grad = dk/dlS * grad lS per token, and in expectation over x ~ pi_theta:
#     k1: E[grad lS]                 = 0                      (no signal at all)
#     k2: E[(lS - lT) grad lS]       = grad KL(pi_theta || pi_T)   (reverse KL; = vanilla OPD)
#     k3: E[(1 - r) grad lS]         = grad KL(pi_T || pi_theta)   (forward KL)
# tests/test_rewards.py checks these three expectations by Monte Carlo.


def kl_estimator(lT_BT, lS_BT, estimator: str) -> torch.Tensor:
    """The estimator's value per token (differentiable in lS)."""
    log_r = lT_BT - lS_BT
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: k1, k2, k3")


def kl_estimator_weight(lT_BT, lS_BT, mask_BT, cfg) -> torch.Tensor:
    """-dk/dlS: the weight the direct loss puts on grad log pi_theta(token), i.e. the reward a
    policy gradient would need to take the same step (k1: -1, k2: lT - lS, k3: r - 1)."""
    log_r = lT_BT.float() - lS_BT.float()
    if cfg.estimator == "k1":
        w = -torch.ones_like(log_r)
    elif cfg.estimator == "k2":
        w = log_r
    else:
        w = torch.expm1(log_r)
    return w * mask_BT


def reward_to_go(r_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = sum_{t' >= t} gamma^(t' - t) r_t' over each rollout's valid tokens (tinker's
    discounted return). gamma = 0 returns r itself (bit for bit); gamma = 1 the undiscounted
    sum of the rest of the rollout."""
    if gamma == 0:
        return r_BT
    r = r_BT * mask_BT
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * mask_BT


def task_advantage(correct_B: torch.Tensor, group: int) -> torch.Tensor:
    """R minus the mean R of the rollouts of the same prompt (GRPO's baseline) when a prompt
    has several consecutive rollouts; R itself with one rollout per prompt."""
    R = correct_B.float()
    if group <= 1:
        return R
    return (R.view(-1, group) - R.view(-1, group).mean(-1, keepdim=True)).reshape(-1)


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
