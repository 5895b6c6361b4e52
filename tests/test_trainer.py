"""The trainer's update against a brute-force recomputation of docs/reference.md §1:
global token-mean policy gradient, stop-token masking, padding that never leaks,
z-score over the whole batch, the exact full-vocab KL, and a batch with N = 0."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, make_config

from poweropd.generation import Rollouts, chat_prompts, completion_masks, left_pad
from poweropd.objectives import get_reward
from poweropd.rewards import masked_moments, zscore
from poweropd.train import opd_update, setup_run

PROBLEMS = ["Ann has 3 pens and buys 4 more. How many now?", "Bo has 12 cups. How many now?", "Cy?"]


class GradRecorder:
    """Stands in for the optimizer: keeps the gradient it is asked to apply."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"lr": 0.0, "params": self.params}]
        self.grads = None

    def step(self):
        self.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def make_run(tmp_path, toy_cache, *overrides):
    cfg = make_config(
        MICRO_PAIR + MICRO_TRAINING + [f"model_pair.cache_dir={toy_cache}", "training.max_grad_norm=1e9", *overrides]
    )
    run = setup_run(cfg, tmp_path)
    run.optimizer = GradRecorder(run.scorer.parameters())
    return run


def make_rollouts(run, completions, extra_pad=0, after_stop=None, seed=0):
    """Hand-built rollouts, shaped like `generate` output. `completions` lists token ids
    per rollout; a rollout without a stop token is truncated, so it is extended with
    random tokens to the full width. The masked tail after a stop token is padding, or
    random tokens with `after_stop="random"`."""
    tok, pad, stop = run.pair.tokenizer, run.pair.pad_id, run.pair.stop_ids[0]
    prompts = chat_prompts(tok, [PROBLEMS[i % len(PROBLEMS)] for i in range(len(completions))])
    ids_BP, mask_BP = left_pad(prompts, pad)
    if extra_pad:
        ids_BP = torch.cat([torch.full((len(prompts), extra_pad), pad), ids_BP], 1)
        mask_BP = torch.cat([torch.zeros(len(prompts), extra_pad, dtype=torch.long), mask_BP], 1)
    width = max(len(c) for c in completions)
    gen = torch.Generator().manual_seed(seed)
    comp_BT = torch.full((len(completions), width), pad)
    for i, c in enumerate(completions):
        comp_BT[i, : len(c)] = torch.tensor(c)
        if stop not in c or after_stop == "random":
            comp_BT[i, len(c) :] = torch.randint(5, len(tok), (width - len(c),), generator=gen)
    valid, stopped = completion_masks(comp_BT, [stop])
    return Rollouts(
        torch.cat([ids_BP, comp_BT], 1), torch.cat([mask_BP, valid.long()], 1), ids_BP.shape[1], valid, stopped
    )


def sample_completions(run, lengths, stop_at_end):
    gen = torch.Generator().manual_seed(1)
    stop = run.pair.stop_ids[0]
    out = []
    for n, ends in zip(lengths, stop_at_end):
        body = torch.randint(5, len(run.pair.tokenizer), (n,), generator=gen).tolist()
        out.append(body + [stop] if ends else body)
    return out


def brute_force(run, rollouts, stop_token="mask", loss_agg="token_mean"):
    """-(1/N) sum_t sg[r_t] lS_t from full logits of both models; returns (loss, grads, mask)."""
    P = rollouts.prompt_len
    ids, attn = rollouts.input_ids_BS, rollouts.attention_mask_BS
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    target_BT = ids[:, P:]

    def token_logprobs(model):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(2, target_BT[..., None]).squeeze(-1)

    student = run.student
    with torch.no_grad():
        lT = token_logprobs(run.pair.teacher)
    lS = token_logprobs(student)
    mask = rollouts.loss_mask_BT(stop_token).float()
    rc = run.cfg.reward
    if rc.name == "full_vocab":
        logits_s = student(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1 : -1].double()
        with torch.no_grad():
            logits_t = run.pair.teacher(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1 : -1]
        log_ps, log_pt = torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t.double(), -1)
        per_token = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        r = get_reward(rc.name)(lT, lS.detach(), mask, rc)
        if rc.normalize == "zscore":
            r = zscore(r, mask, masked_moments(r, mask))
        per_token = -r * lS
    if loss_agg == "token_mean":
        loss = (per_token * mask).sum() / mask.sum()
    else:
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_seq[mask.sum(-1) > 0].mean()
    params = list(run.scorer.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)], mask


def assert_grads_close(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        ["reward=vanilla"],
        ["reward=power", "reward.alpha=2.0"],
        ["reward=clip"],
        ["reward=tanh", "reward.tau=0.5"],
        ["reward=zscore"],
        ["reward=zscore", "training.micro_batch_size=2"],  # moments from the no-grad pre-pass
        ["reward=power", "training.micro_batch_size=1"],  # gradient accumulated over micro-batches
        ["reward=vanilla", "reward.stop_token=raw"],
        ["reward=vanilla", "reward.loss_agg=seq_mean"],
        ["reward=full_vocab"],
        ["reward=full_vocab", "training.micro_batch_size=2", "training.logprob_chunk_size=3"],
        # the authors' full-vocab reduction: per-rollout token means, terminal stop token kept
        ["method=full_vocab_seqmean_keepstop", "training.micro_batch_size=2"],
    ],
)
def test_update_gradient_equals_brute_force(tmp_path, toy_cache, overrides):
    run = make_run(tmp_path, toy_cache, *overrides)
    completions = sample_completions(run, [5, 1, 10, 4, 0], [True, True, False, True, True])
    rollouts = make_rollouts(run, completions)
    rc = run.cfg.reward
    loss_ref, grads_ref, mask = brute_force(run, rollouts, rc.stop_token, rc.loss_agg)
    metrics, _ = opd_update(run, rollouts)
    assert metrics["n_tokens"] == int(mask.sum())
    assert metrics["loss"] == pytest.approx(loss_ref, rel=1e-4, abs=1e-6)
    assert_grads_close(run.optimizer.grads, grads_ref)
    pre_clip = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads_ref))
    assert metrics["grad_norm"] == pytest.approx(pre_clip, rel=1e-4)


def test_stop_token_mask_drops_only_the_terminal_stop(tmp_path, toy_cache):
    run = make_run(tmp_path, toy_cache)
    stop = run.pair.stop_ids[0]
    rollouts = make_rollouts(run, [[7, 8, stop], [7, 8, 9, 10], [stop], [9, stop]])
    assert rollouts.completion_BT.sum(-1).tolist() == [3, 4, 1, 2]
    assert rollouts.stopped_B.tolist() == [True, False, True, True]
    assert rollouts.loss_mask_BT("mask").sum(-1).tolist() == [2, 4, 0, 1]  # truncated row keeps all 4
    assert rollouts.loss_mask_BT("raw").sum(-1).tolist() == [3, 4, 1, 2]


def test_completion_mask_stops_at_the_first_stop_token():
    stop, pad = 2, 0
    comp = torch.tensor([[5, 6, stop, 7, stop], [stop, 5, 5, 5, 5], [5, 5, 5, 5, 5]])
    valid, stopped = completion_masks(comp, [stop, 99])
    assert valid.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert stopped.tolist() == [True, True, False]
    del pad


@pytest.mark.parametrize("reward", ["vanilla", "zscore", "full_vocab"])
def test_padding_never_leaks(tmp_path, toy_cache, reward):
    """Extra left padding and garbage after the stop token change nothing."""
    completions = sample_completions(make_run(tmp_path, toy_cache), [6, 3, 8], [True, True, False])
    results = []
    for extra_pad, after_stop in [(0, None), (3, "random")]:
        run = make_run(tmp_path / f"{extra_pad}", toy_cache, f"reward={reward}")
        metrics, tokens = opd_update(run, make_rollouts(run, completions, extra_pad, after_stop))
        results.append((metrics, tokens, run.optimizer.grads))
    (m0, t0, g0), (m1, t1, g1) = results
    for key in ("loss", "n_tokens", "response_length", "log_ratio/mean", "log_ratio/min", "log_ratio/max"):
        assert m0[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(t0["log_ratio"], t1["log_ratio"], rtol=1e-5, atol=1e-5)
    assert_grads_close(g1, g0)


def test_batch_without_valid_tokens_is_skipped(tmp_path, toy_cache):
    run = make_run(tmp_path, toy_cache, "reward=zscore")
    stop = run.pair.stop_ids[0]
    metrics, tokens = opd_update(run, make_rollouts(run, [[stop], [stop], [stop]]))
    assert metrics["skipped"] == 1 and metrics["n_tokens"] == 0
    assert metrics["response_length"] == 1.0 and tokens == {}
    assert run.optimizer.grads is None  # no update was applied
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in metrics.values())


@pytest.mark.parametrize(
    "overrides",
    [
        ["reward=power", "reward.alpha=3.0"],  # fused lm-head kernel
        ["reward=zscore", "training.micro_batch_size=2"],  # log-probs kernel, then the rewards
        ["reward=kl_loss"],
        ["reward=full_vocab", "training.logprob_chunk_size=3"],
        ["reward=jsd"],
        ["reward=topk_kl", "reward.k=4"],
    ],
)
def test_entropy_and_rewarded_share_equal_brute_force(tmp_path, toy_cache, overrides):
    """entropy/mean: the student's -sum_v p log p over the valid tokens, from full logits;
    reward/frac_above_0.01: the share of valid tokens with |reward| > 0.01."""
    run = make_run(tmp_path, toy_cache, *overrides)
    rollouts = make_rollouts(run, sample_completions(run, [5, 1, 10, 4], [True, True, False, True]))
    P, ids, attn = rollouts.prompt_len, rollouts.input_ids_BS, rollouts.attention_mask_BS
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = run.student(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1 : -1].double()
    log_p = torch.log_softmax(logits, -1)
    mask = rollouts.loss_mask_BT(run.cfg.reward.stop_token)
    expected = (-(log_p.exp() * log_p).sum(-1))[mask].mean().item()
    metrics, tokens = opd_update(run, rollouts)
    assert metrics["entropy/mean"] == pytest.approx(expected, rel=1e-5)
    assert tokens["entropy"].numel() == int(mask.sum())
    if "reward" in tokens:
        share = (tokens["reward"].abs() > 0.01).double().mean().item()
        assert metrics["reward/frac_above_0.01"] == pytest.approx(share) and 0 <= share <= 1
    else:
        assert "reward/frac_above_0.01" not in metrics  # a divergence has no per-token reward


def test_statistics_cover_valid_tokens_only(tmp_path, toy_cache):
    run = make_run(tmp_path, toy_cache, "reward=power", "reward.alpha=3.0")
    completions = sample_completions(run, [4, 7, 6], [True, False, True])
    rollouts = make_rollouts(run, completions, after_stop="random")
    _, _, mask = brute_force(run, rollouts)
    metrics, tokens = opd_update(run, rollouts)
    assert tokens["reward"].numel() == int(mask.sum()) == metrics["n_tokens"]
    assert metrics["reward/max"] <= 1.0 and metrics["reward/min"] >= -1.0
    assert metrics["reward/min"] <= metrics["reward/p5"] <= metrics["reward/mean"] <= metrics["reward/max"]
    # positions of the valid tokens: 0..3 of row 0, 0..6 of row 1 (truncated), 0..5 of row 2
    assert sorted(tokens["pos"].tolist()) == sorted([*range(4), *range(7), *range(6)])


@pytest.mark.parametrize(
    ("overrides", "teacher_passes", "student_passes", "head_passes"),
    [
        (["reward=power"], 1, 1, 2),
        (["reward=full_vocab"], 1, 1, 1),
        (["reward=vanilla", "training.micro_batch_size=2"], 3, 3, 2),
        # z-score over several micro-batches needs the batch moments first: one no-grad pre-pass
        (["reward=zscore", "training.micro_batch_size=2"], 3, 6, 3),
    ],
)
def test_one_update_runs_each_model_once_and_projects_only_completion_tokens(
    tmp_path, toy_cache, monkeypatch, overrides, teacher_passes, student_passes, head_passes
):
    """No extra model pass for statistics or logging, no lm-head module call (the kernels use
    the weight on completion hidden states only), and exactly the valid completion tokens
    reach the vocabulary projection."""
    import poweropd.models as models
    import poweropd.objectives as objectives

    run = make_run(tmp_path, toy_cache, *overrides)
    calls = {"teacher": 0, "student": 0, "head": 0}
    for name, model in (("teacher", run.pair.teacher), ("student", run.student)):
        model.get_decoder().register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    projected = []
    # the kernels are called from models (log-probs) and from the objectives (losses)
    for module, kernel in (
        (models, "sampled_logprobs"),
        (objectives, "sampled_logprobs"),  # the student's log-probs (and entropy) when rewards wait for the batch
        (objectives, "sampled_pg_loss"),
        (objectives, "full_vocab_kl"),
    ):
        original = getattr(module, kernel)

        def spy(hidden_ND, *args, _original=original, **kwargs):
            projected.append(hidden_ND.shape[0])
            return _original(hidden_ND, *args, **kwargs)

        monkeypatch.setattr(module, kernel, spy)
    completions = sample_completions(run, [5, 1, 10, 4, 0], [True, True, False, True, True])
    metrics, _ = opd_update(run, make_rollouts(run, completions, extra_pad=2, after_stop="random"))
    assert calls == {"teacher": teacher_passes, "student": student_passes, "head": 0}
    # every kernel call projects its micro-batch's valid completion tokens and nothing else:
    # each pass over the batch (teacher, student, z-score pre-pass; full-vocab scores the
    # teacher's hidden states inside the student's KL call) sends exactly N tokens to a head
    assert sum(projected) == head_passes * metrics["n_tokens"]
