"""The objectives beyond the paper (docs/objectives.md): generalised JSD, top-k forward KL,
the k1/k2/k3 estimators as direct losses, reward-to-go, task-reward mixing and Box-Cox.

Kernels against brute-force autograd (ragged chunks included), their limits, the
estimators' expected gradients (exactly and by Monte Carlo), the trainer's whole update
against a brute-force recomputation for each objective, config composition and one-line
refusals, and a micro end-to-end run of each."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import MICRO_PAIR, MICRO_TRAINING, make_config
from test_trainer import assert_grads_close, make_rollouts, make_run, sample_completions

from poweropd.config import RewardConfig
from poweropd.errors import ConfigError
from poweropd.logprobs import full_vocab_kl, generalized_jsd, teacher_topk, topk_forward_kl
from poweropd.objectives import method_tag
from poweropd.rewards import kl_estimator, kl_estimator_weight, reward_to_go, task_advantage
from poweropd.train import opd_update


def heads(n=13, d=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hS = torch.randn(n, d, generator=g, requires_grad=True)
    wS = torch.randn(v, d, generator=g, requires_grad=True)
    hT, wT = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    return hS, wS, hT, wT, targets, weights


def trl_style_jsd(lS, lT, beta):
    """TRL's generalized_jsd_loss, written independently with F.kl_div (KL(target || input))."""
    if beta == 0:
        return F.kl_div(lS, lT, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lT, lS, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=lS.dtype)
    lM = torch.logsumexp(torch.stack([lS + torch.log(1 - b), lT + torch.log(b)]), dim=0)
    return beta * F.kl_div(lM, lT, reduction="none", log_target=True).sum(-1) + (1 - beta) * F.kl_div(
        lM, lS, reduction="none", log_target=True
    ).sum(-1)


def brute(hS, wS, hT, wT):
    lS = torch.log_softmax(hS.double() @ wS.double().T, -1)
    lT = torch.log_softmax(hT.double() @ wT.double().T, -1)
    return lS, lT


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [5, 13, 64])  # ragged (13 = 5 + 5 + 3), exact, one chunk
def test_generalized_jsd_value_and_gradient_match_brute_force(beta, chunk):
    hS, wS, hT, wT, t, w = heads()
    loss, jsd_N, lS_N, lT_N = generalized_jsd(hS, wS, hT, wT, t, w, beta, chunk)
    gh, gw = torch.autograd.grad(loss, (hS, wS))
    lS, lT = brute(hS, wS, hT, wT)
    ref_N = trl_style_jsd(lS, lT, beta)
    ref = (ref_N * w.double()).sum()
    rh, rw = torch.autograd.grad(ref, (hS, wS))
    torch.testing.assert_close(jsd_N.double(), ref_N.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lS_N.double(), lS.gather(1, t[:, None])[:, 0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lT_N.double(), lT.gather(1, t[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    assert (jsd_N >= -1e-6).all()  # a divergence


def test_jsd_endpoints_are_the_two_kls():
    hS, wS, hT, wT, t, w = heads()
    lS, lT = brute(hS, wS, hT, wT)
    forward = (lT.exp() * (lT - lS)).sum(-1)
    reverse = (lS.exp() * (lS - lT)).sum(-1)
    _, j0, _, _ = generalized_jsd(hS, wS, hT, wT, t, w, 0.0, 4)
    _, j1, _, _ = generalized_jsd(hS, wS, hT, wT, t, w, 1.0, 4)
    torch.testing.assert_close(j0.double(), forward.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(j1.double(), reverse.detach(), rtol=1e-5, atol=1e-6)
    # beta = 1 is the paper's Full-vocab objective: same value and gradient as its own kernel
    loss_j, *_ = generalized_jsd(hS, wS, hT, wT, t, w, 1.0, 4)
    loss_f, *_ = full_vocab_kl(hS, wS, hT, wT, t, w, 4)
    gj = torch.autograd.grad(loss_j, (hS, wS))
    gf = torch.autograd.grad(loss_f, (hS, wS))
    torch.testing.assert_close(loss_j, loss_f, rtol=1e-5, atol=1e-6)
    for a, b in zip(gj, gf):  # two fp32 kernels, two summation orders: CPUs round them differently
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 11])
@pytest.mark.parametrize("chunk", [4, 13])
def test_topk_forward_kl_matches_brute_force_and_k_equal_v_is_forward_kl(k, chunk):
    hS, wS, hT, wT, t, w = heads()
    vals, idx, lT_N = teacher_topk(hT, wT, t, k, chunk)
    loss, kl_N, _ = topk_forward_kl(hS, wS, vals, idx, t, w, chunk)
    gh, gw = torch.autograd.grad(loss, (hS, wS))
    lS, lT = brute(hS, wS, hT, wT)
    top_lT, top_idx = lT.topk(k, -1)
    ref_N = (top_lT.exp() * (top_lT - lS.gather(1, top_idx))).sum(-1)
    ref = (ref_N * w.double()).sum()
    rh, rw = torch.autograd.grad(ref, (hS, wS))
    assert torch.equal(idx, top_idx)
    torch.testing.assert_close(kl_N.double(), ref_N.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lT_N.double(), lT.gather(1, t[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    if k == wS.shape[0]:  # the whole vocabulary: exactly the forward KL, i.e. JSD at beta = 0
        _, j0, _, _ = generalized_jsd(hS, wS, hT, wT, t, w, 0.0, chunk)
        torch.testing.assert_close(kl_N, j0, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# KL estimators as direct losses


def test_k3_is_non_negative_and_all_estimators_are_zero_when_the_models_agree():
    g = torch.Generator().manual_seed(0)
    lT, lS = -torch.rand(10_000, generator=g) * 30, -torch.rand(10_000, generator=g) * 30
    assert (kl_estimator(lT, lS, "k3") >= 0).all()
    assert (kl_estimator(lT, lS, "k2") >= 0).all()
    for est in ("k1", "k2", "k3"):
        assert kl_estimator(lS, lS, est).abs().max() == 0


def _estimator_setup(v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    lT = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    return z, lT


def _exact_targets(z, lT):
    lS = torch.log_softmax(z, -1)
    reverse = (lS.exp() * (lS - lT)).sum()
    forward = (lT.exp() * (lT - lS)).sum()
    g_rev = torch.autograd.grad(reverse, z, retain_graph=True)[0]
    g_fwd = torch.autograd.grad(forward, z)[0]
    return {"k1": torch.zeros_like(z), "k2": g_rev, "k3": g_fwd}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_direct_estimator_expected_gradient_exact(estimator):
    """E_{x ~ pi_theta}[grad k(x)] with the sampling distribution held fixed, summed exactly:
    k1 -> 0, k2 -> grad KL(pi_theta || pi_T), k3 -> grad KL(pi_T || pi_theta)."""
    z, lT = _estimator_setup()
    want = _exact_targets(z, lT)[estimator]
    lS = torch.log_softmax(z, -1)
    expected_loss = (lS.exp().detach() * kl_estimator(lT, lS, estimator)).sum()
    got = torch.autograd.grad(expected_loss, z)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_direct_estimator_expected_gradient_monte_carlo(estimator):
    """The same by sampling: the mean gradient of the direct loss over 400k sampled tokens
    is within 5 standard errors of the exact gradient it stands for (zero for k1)."""
    z, lT = _estimator_setup()
    want = _exact_targets(z, lT)[estimator]
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x = torch.multinomial(torch.softmax(z.detach(), -1), n, replacement=True, generator=g)
    lS = torch.log_softmax(z, -1)
    # per-sample gradients in closed form via autograd of each distinct token (V of them)
    per_token = torch.stack(
        [torch.autograd.grad(kl_estimator(lT[i], lS[i], estimator), z, retain_graph=True)[0] for i in range(len(z))]
    )
    samples = per_token[x]  # [n, V]
    mean, se = samples.mean(0), samples.std(0) / n**0.5
    assert ((mean - want).abs() <= 5 * se + 1e-9).all(), (mean, want, se)
    if estimator == "k1":
        assert want.abs().max() == 0
    else:
        assert want.abs().max() > 10 * se.max()  # the target is not zero: the test can tell them apart


def test_estimator_weight_is_minus_the_derivative():
    lT = torch.tensor([-1.0, -3.0, -0.2])
    lS = torch.tensor([-2.0, -0.5, -0.2], requires_grad=True)
    for est in ("k1", "k2", "k3"):
        d = torch.autograd.grad(kl_estimator(lT, lS, est).sum(), lS)[0]
        w = kl_estimator_weight(lT, lS.detach(), torch.ones(3), RewardConfig(name="kl_loss", estimator=est))
        torch.testing.assert_close(w, -d)


# ----------------------------------------------------------------------------------------
# Reward-to-go and task rewards


def test_reward_to_go_matches_a_loop_and_gamma_zero_is_the_reward_itself():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert reward_to_go(r, mask, 0.0) is r  # today's per-token rewards, bit for bit
    for gamma in (0.5, 0.9, 1.0):
        got = reward_to_go(r, mask, gamma)
        want = torch.zeros_like(r)
        for b in range(3):
            for t in range(7):
                if mask[b, t]:
                    want[b, t] = sum(gamma ** (u - t) * r[b, u] for u in range(t, 7) if mask[b, u])
        torch.testing.assert_close(got, want)


def test_task_advantage_is_group_centred():
    R = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(task_advantage(R, 1), R)
    torch.testing.assert_close(task_advantage(R, 3), torch.tensor([1 / 3, -2 / 3, 1 / 3, 2 / 3, -1 / 3, -1 / 3]))


# ----------------------------------------------------------------------------------------
# The trainer's update against brute force, per objective


def brute_objective(run, rollouts, correct_B=None):
    """Token-mean loss of the configured objective from full logits, and its gradient."""
    P = rollouts.prompt_len
    ids, attn = rollouts.input_ids_BS, rollouts.attention_mask_BS
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    target = ids[:, P:]
    rc = run.cfg.reward
    logits_s = run.student(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1 : -1].double()
    with torch.no_grad():
        logits_t = run.pair.teacher(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1 : -1].double()
    full_s, full_t = torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)
    lS, lT = full_s.gather(2, target[..., None])[..., 0], full_t.gather(2, target[..., None])[..., 0]
    mask = rollouts.loss_mask_BT(rc.stop_token)
    m = mask.double()
    if rc.name == "jsd":
        per_token = trl_style_jsd(full_s, full_t, rc.beta)
    elif rc.name == "topk_kl":
        top_lT, top_idx = full_t.topk(min(rc.k, full_t.shape[-1]), -1)
        per_token = (top_lT.exp() * (top_lT - full_s.gather(2, top_idx))).sum(-1)
    elif rc.name == "kl_loss":
        per_token = kl_estimator(lT, lS, rc.estimator)
        if rc.task_weight:
            per_token = per_token - rc.task_weight * correct_B.double()[:, None] * lS
    else:
        from poweropd.objectives import get_reward

        r = get_reward(rc.name)(lT, lS.detach(), m, rc)
        if rc.task_weight and not rc.gamma:
            r = r + rc.task_weight * correct_B.double()[:, None]
        elif rc.task_weight:  # terminal reward on the last loss token
            last = (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True)) & mask
            r = r + rc.task_weight * correct_B.double()[:, None] * last
        adv = torch.zeros_like(r)
        for b in range(r.shape[0]):  # discounted return, written out
            running = 0.0
            for t in reversed(range(r.shape[1])):
                running = r[b, t] * m[b, t] + rc.gamma * running
                adv[b, t] = running * m[b, t]
        per_token = -adv * lS
    loss = (per_token * m).sum() / m.sum()
    params = list(run.scorer.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


OBJECTIVES = [
    ["reward=jsd", "reward.beta=0.5"],
    ["reward=jsd", "reward.beta=0.0", "training.micro_batch_size=2", "training.logprob_chunk_size=3"],
    ["reward=jsd", "reward.beta=1.0"],
    ["reward=topk_kl", "reward.k=4", "training.logprob_chunk_size=5"],
    ["reward=kl_loss", "reward.estimator=k1"],
    ["reward=kl_loss", "reward.estimator=k3", "training.micro_batch_size=2"],
    ["reward=kl_loss", "reward.estimator=k2", "reward.task_weight=0.7"],
    ["reward=box_cox", "reward.alpha=3"],
    ["reward=vanilla", "reward.gamma=0.9"],
    ["reward=power", "reward.alpha=2", "reward.gamma=1.0", "training.micro_batch_size=2"],
    ["reward=power", "reward.alpha=2", "reward.task_weight=0.5"],
    ["reward=clip", "reward.task_weight=0.5", "reward.gamma=0.8"],
]


@pytest.mark.parametrize("overrides", OBJECTIVES, ids=lambda o: " ".join(o))
def test_update_of_each_objective_equals_brute_force(tmp_path, toy_cache, overrides):
    run = make_run(tmp_path, toy_cache, *overrides)
    completions = sample_completions(run, [5, 1, 10, 4, 0], [True, True, False, True, True])
    rollouts = make_rollouts(run, completions)
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    loss_ref, grads_ref = brute_objective(run, rollouts, correct)
    metrics, _ = opd_update(run, rollouts, task_correct_B=correct)
    assert metrics["loss"] == pytest.approx(loss_ref, rel=1e-4, abs=1e-6)
    assert_grads_close(run.optimizer.grads, grads_ref)


def test_gamma_zero_and_task_weight_zero_change_nothing(tmp_path, toy_cache):
    completions = None
    results = []
    for extra in ([], ["reward.gamma=0.0", "reward.task_weight=0.0"]):
        run = make_run(tmp_path / str(len(extra)), toy_cache, "reward=power", "reward.alpha=2", *extra)
        completions = completions or sample_completions(run, [5, 1, 10, 4, 0], [True, True, False, True, True])
        metrics, _ = opd_update(run, make_rollouts(run, completions), task_correct_B=torch.ones(5))
        results.append((metrics["loss"], [g.clone() for g in run.optimizer.grads]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_box_cox_is_power_divided_by_alpha(tmp_path, toy_cache):
    """The paper's section 4 claim, at the level of one gradient: Box-Cox's update direction is
    PowerOPD's, scaled by 1/alpha (so under SGD it is PowerOPD at lr/alpha; under Adam, whose
    step is invariant to a constant gradient scale up to eps, the two steps coincide)."""
    grads = {}
    for name in ("power", "box_cox"):
        run = make_run(tmp_path / name, toy_cache, f"reward={name}", "reward.alpha=4")
        rollouts = make_rollouts(run, sample_completions(run, [5, 1, 10, 4], [True, True, False, True]))
        opd_update(run, rollouts)
        grads[name] = run.optimizer.grads
    for p, b in zip(grads["power"], grads["box_cox"]):
        torch.testing.assert_close(b * 4, p, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Config: composition, labels, tags and refusals


@pytest.mark.parametrize(
    "overrides, label, tag",
    [
        (["reward=jsd", "reward.beta=0.5"], "JSD β=0.5", "jsd0.5"),
        (["reward=topk_kl", "reward.k=64"], "Top-k KL k=64", "topk64"),
        (["reward=kl_loss", "reward.estimator=k2"], "KL k2 loss", "kl_k2"),
        (["reward=box_cox", "reward.alpha=5"], "Box-Cox α=5", "boxcox5"),
        (["reward=vanilla", "reward.gamma=0.9"], "Vanilla γ=0.9", "vanilla_g0.9"),
        (
            ["reward=power", "reward.alpha=500", "reward.task_weight=0.5"],
            "PowerOPD α=500 + task 0.5",
            "power500_task0.5",
        ),
        (["reward=power", "reward.alpha=500"], "PowerOPD α=500", "power500"),  # unchanged for the paper's rows
    ],
)
def test_every_objective_composes_with_its_label_and_directory_tag(overrides, label, tag):
    cfg = make_config(MICRO_PAIR + overrides)
    assert cfg.reward.label == label
    from conftest import compose

    assert method_tag(compose(MICRO_PAIR + overrides).reward) == tag


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reward=jsd", "reward.beta=1.5"], "reward.beta must be in [0, 1]"),
        (["reward=topk_kl", "reward.k=0"], "reward.k must be >= 1"),
        (["reward=kl_loss", "reward.estimator=k4"], "reward.estimator='k4' is not valid"),
        (["reward=vanilla", "reward.gamma=1.5"], "reward.gamma must be in [0, 1]"),
        (["reward=power", "reward.task_weight=-1"], "reward.task_weight must be >= 0"),
        (["reward=jsd", "reward.gamma=0.9"], "reward=jsd is a divergence over the vocabulary"),
        (["reward=topk_kl", "reward.task_weight=0.5"], "reward=topk_kl is a divergence over the vocabulary"),
        (["reward=full_vocab", "reward.gamma=0.5"], "reward=full_vocab is a divergence over the vocabulary"),
        (["reward=kl_loss", "reward.gamma=0.5"], "reward=kl_loss back-propagates its estimator directly"),
    ],
)
def test_bad_objective_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        make_config(MICRO_PAIR + overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["reward=jsd", "reward.beta=0.5"],
        ["reward=topk_kl", "reward.k=8"],
        ["reward=kl_loss", "reward.estimator=k3"],
        ["reward=vanilla", "reward.gamma=0.9"],
        ["reward=power", "reward.task_weight=0.5", "training.rollouts_per_prompt=2"],
        ["reward=box_cox", "reward.alpha=5"],
    ],
    ids=lambda o: " ".join(o),
)
def test_micro_end_to_end_run_of_each_objective(tmp_path, toy_cache, overrides):
    from poweropd.train import train

    cfg = make_config(
        MICRO_PAIR
        + MICRO_TRAINING
        + [f"model_pair.cache_dir={toy_cache}", "training.steps=2", "training.save_every=0", *overrides]
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    if cfg.reward.task_weight:
        assert all(0 <= r["task/accuracy"] <= 1 for r in rows[1:])
    assert summary["method"] == cfg.reward.label
