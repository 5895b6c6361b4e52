"""The reward formulas of docs/reference.md §2 and the properties P1 / P2."""

from __future__ import annotations

import math

import pytest
import torch

from poweropd.config import RewardConfig
from poweropd.errors import ConfigError
from poweropd.objectives import REGISTRY, get_reward
from poweropd.rewards import masked_moments, zscore

ALPHAS = [1e-3, 0.1, 0.5, 1.0, 5.0, 10.0, 100.0, 500.0, 1e4]


def logprob_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of log-probs from near-impossible (-1e4) to certain (0)."""
    values = torch.tensor([-1e4, -300.0, -50.0, -20.0, -5.0, -1.0, -0.3, -1e-3, -1e-7, 0.0])
    lT, lS = torch.meshgrid(values, values, indexing="ij")
    return lT.flatten(), lS.flatten()


def cfg(**kw) -> RewardConfig:
    return RewardConfig(**kw)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_power_is_bounded_by_one(alpha):
    lT, lS = logprob_grid()
    r = get_reward("power")(lT, lS, torch.ones_like(lT), cfg(name="power", alpha=alpha))
    assert torch.isfinite(r).all()
    assert r.abs().max() <= 1.0
    # the bound is attained: teacher certain, student impossible
    r_max = get_reward("power")(
        torch.tensor([0.0]), torch.tensor([-1e7]), torch.ones(1), cfg(name="power", alpha=alpha)
    )
    assert r_max.item() == pytest.approx(1.0)


def test_power_matches_probability_form():
    pT, pS = torch.tensor([0.9, 0.2, 0.5, 1e-6]), torch.tensor([0.3, 0.7, 0.5, 0.4])
    for alpha in (0.5, 2.0, 10.0):
        r = get_reward("power")(pT.log(), pS.log(), torch.ones(4), cfg(name="power", alpha=alpha))
        torch.testing.assert_close(r, pT**alpha - pS**alpha, rtol=1e-5, atol=1e-7)


def test_vanilla_is_unbounded():
    lT, lS = logprob_grid()
    r = get_reward("vanilla")(lT, lS, torch.ones_like(lT), cfg(name="vanilla"))
    assert r.min() <= -1e4 + 1 and r.max() >= 1e4 - 1


@pytest.mark.parametrize(
    "name,params",
    [
        ("vanilla", {}),
        ("clip", {}),
        ("clip", {"clip_low": -0.5, "clip_high": 2.0}),
        ("tanh", {"tau": 0.3}),
        ("tanh", {"tau": 7.0}),
        *[("power", {"alpha": a}) for a in ALPHAS],
    ],
)
def test_sign_consistency(name, params):
    """P2: r > 0 iff pi_T > pi_theta, r < 0 iff pi_T < pi_theta, r = 0 on equality."""
    lT, lS = logprob_grid()
    r = get_reward(name)(lT, lS, torch.ones_like(lT), cfg(name=name, **params))
    gap = lT - lS
    # Where float32 can still tell the probabilities apart, the sign must agree exactly.
    if name == "power":
        distinct = torch.exp(params["alpha"] * lT) != torch.exp(params["alpha"] * lS)
    else:
        distinct = gap != 0
    assert torch.equal(torch.sign(r[distinct]), torch.sign(gap[distinct]))
    assert (r[gap == 0] == 0).all()
    assert (r[~distinct] == 0).all()  # equal (or indistinguishable) probabilities give zero


def test_box_cox_limit_recovers_log_ratio():
    """(x^alpha - 1)/alpha -> log x, so (pi_T^alpha - pi_theta^alpha)/alpha -> lT - lS."""
    lT = torch.tensor([-3.0, -0.5, -8.0, 0.0], dtype=torch.float64)
    lS = torch.tensor([-1.0, -2.5, -0.1, -4.0], dtype=torch.float64)
    errors = []
    for alpha in (1.0, 1e-1, 1e-2, 1e-3, 1e-4):
        r = get_reward("power")(lT, lS, torch.ones_like(lT), cfg(name="power", alpha=alpha))
        errors.append(((r / alpha) - (lT - lS)).abs().max().item())
    assert errors == sorted(errors, reverse=True)  # monotone convergence
    assert errors[-1] < 1e-2 * errors[0]
    assert errors[-1] < 5e-3


def test_clip_values():
    lT = torch.tensor([-5.0, -1.0, -1.0, 0.0, -0.2])
    lS = torch.tensor([-1.0, -1.5, -0.5, -3.0, -0.1])
    r = get_reward("clip")(lT, lS, torch.ones(5), cfg(name="clip"))
    torch.testing.assert_close(r, torch.tensor([-1.0, 0.5, -0.5, 1.0, -0.1]))
    r = get_reward("clip")(lT, lS, torch.ones(5), cfg(name="clip", clip_low=-2.0, clip_high=0.25))
    torch.testing.assert_close(r, torch.tensor([-2.0, 0.25, -0.5, 0.25, -0.1]))


def test_tanh_values():
    lT, lS = torch.tensor([-3.0, -1.0, 0.0]), torch.tensor([-1.0, -1.0, -2.0])
    r = get_reward("tanh")(lT, lS, torch.ones(3), cfg(name="tanh", tau=2.0))
    expected = torch.tensor([math.tanh(-1.0), 0.0, math.tanh(1.0)])
    torch.testing.assert_close(r, expected)


def test_rewards_are_zero_outside_the_mask():
    lT, lS = torch.full((2, 3), -4.0), torch.full((2, 3), -0.5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    for name, fn in [(n, o.reward) for n, o in REGISTRY.items() if o.reward is not None]:
        r = fn(lT, lS, mask, cfg(name=name, normalize="zscore" if name == "zscore" else "none"))
        assert (r[mask == 0] == 0).all(), name
        assert (r[mask == 1] != 0).all(), name


def test_zscore_uses_valid_tokens_of_the_whole_batch_only():
    r = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 1e6, -7.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    z = zscore(r, mask, masked_moments(r, mask))
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (valid - valid.mean()) / valid.std(unbiased=False)  # population std
    torch.testing.assert_close(z[mask == 1], expected)
    assert (z[mask == 0] == 0).all()  # padding garbage neither leaks in nor comes out


def test_zscore_moments_add_up_over_micro_batches():
    r = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    whole = masked_moments(r, mask)
    parts = masked_moments(r[:2], mask[:2]) + masked_moments(r[2:], mask[2:])
    torch.testing.assert_close(whole, parts)


def test_zscore_can_flip_a_sign():
    """All tokens are better under the teacher (r > 0), yet centring makes one negative."""
    r = torch.tensor([[0.1, 2.0, 3.0]])
    mask = torch.ones_like(r)
    z = zscore(r, mask, masked_moments(r, mask))
    assert (r > 0).all() and (z < 0).any()


def test_zscore_of_constant_rewards_is_finite():
    r = torch.full((2, 3), 0.7)
    z = zscore(r, torch.ones_like(r), masked_moments(r, torch.ones_like(r)))
    assert torch.isfinite(z).all() and (z == 0).all()


def test_vanilla_never_normalises():
    with pytest.raises(ConfigError, match="never normalises"):
        RewardConfig(name="vanilla", normalize="zscore")
    assert RewardConfig(name="vanilla").normalize == "none"


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"name": "power", "alpha": 0.0}, "reward.alpha must be > 0"),
        ({"name": "power", "alpha": -1.0}, "reward.alpha must be > 0"),
        ({"name": "clip", "clip_low": 1.0, "clip_high": 1.0}, "clip_low"),
        ({"name": "clip", "clip_low": 2.0, "clip_high": -1.0}, "clip_low"),
        ({"name": "tanh", "tau": 0.0}, "reward.tau must be > 0"),
        ({"name": "powr"}, "choose one of: vanilla, clip, tanh, zscore, power, full_vocab"),
        ({"name": "zscore", "normalize": "none"}, "reward.normalize=zscore"),
    ],
)
def test_bad_reward_settings_fail_with_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as info:
        RewardConfig(**kw)
    assert "\n" not in str(info.value)


def test_unknown_reward_lists_valid_names():
    with pytest.raises(KeyError, match="valid: vanilla, clip, tanh, zscore, power"):
        get_reward("log")
