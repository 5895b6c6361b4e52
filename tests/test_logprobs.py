"""Chunked lm-head kernels against naive full log-softmax (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from poweropd.logprobs import full_vocab_kl, sampled_logprobs


def make_inputs(n=29, d=12, v=97, d_t=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=gen) * 0.7).requires_grad_()
    w = (torch.randn(v, d, generator=gen) * 0.7).requires_grad_()
    h_t = torch.randn(n, d_t, generator=gen) * 0.7
    w_t = torch.randn(v, d_t, generator=gen) * 0.7
    targets = torch.randint(0, v, (n,), generator=gen)
    return h, w, h_t, w_t, targets


def naive_sampled(h, w, targets):
    return torch.log_softmax(h @ w.T, dim=-1).gather(1, targets[:, None]).squeeze(1)


def grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    fn().backward()
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk", [1, 3, 7, 29, 1000])
def test_sampled_logprobs_match_naive(chunk):
    h, w, _, _, targets = make_inputs()
    upstream = torch.randn(h.shape[0])
    ours = sampled_logprobs(h, w, targets, chunk)
    torch.testing.assert_close(ours, naive_sampled(h, w, targets), rtol=1e-5, atol=1e-5)
    g_ours = grads(lambda: (sampled_logprobs(h, w, targets, chunk) * upstream).sum(), h, w)
    g_ref = grads(lambda: (naive_sampled(h, w, targets) * upstream).sum(), h, w)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sampled_logprobs_are_normalised():
    """Scoring every vocabulary entry at one position must give a distribution."""
    h, w, _, _, _ = make_inputs(n=1)
    v = w.shape[0]
    lp = sampled_logprobs(h.detach().expand(v, -1), w.detach(), torch.arange(v), chunk=10)
    assert torch.logsumexp(lp, 0).abs() < 1e-5


def test_sampled_logprobs_without_weight_grad_and_under_no_grad():
    h, w, _, _, targets = make_inputs()
    w_frozen = w.detach()
    (gh,) = grads(lambda: sampled_logprobs(h, w_frozen, targets, 5).sum(), h)
    (gh_ref,) = grads(lambda: naive_sampled(h, w_frozen, targets).sum(), h)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not sampled_logprobs(h, w, targets, 5).requires_grad


def test_sampled_logprobs_bf16_inputs_compute_in_fp32():
    h, w, _, _, targets = make_inputs()
    hb = h.detach().bfloat16().requires_grad_()
    out = sampled_logprobs(hb, w, targets, 4)
    assert out.dtype == torch.float32
    ref = naive_sampled(hb.detach().float(), w.detach(), targets)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert hb.grad.dtype == torch.bfloat16


def test_empty_batch():
    h, w, h_t, w_t, targets = make_inputs()
    empty = torch.zeros(0, dtype=torch.long)
    out = sampled_logprobs(h[:0], w, empty, 4)
    assert out.shape == (0,)
    out.sum().backward()
    assert (w.grad == 0).all()
    loss, kl, _, _ = full_vocab_kl(h[:0], w, h_t[:0], w_t, empty, torch.zeros(0), 4)
    assert loss.item() == 0.0 and kl.shape == (0,)


def brute_force_kl(h, w, h_t, w_t):
    """KL(pS || pT) per row, computed the slow, obvious way in float64."""
    log_ps = torch.log_softmax((h @ w.T).double(), -1)
    log_pt = torch.log_softmax((h_t @ w_t.T).double(), -1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 4, 29, 64])
def test_full_vocab_kl_matches_brute_force(chunk):
    h, w, h_t, w_t, targets = make_inputs()
    weights = torch.rand(h.shape[0])
    loss, kl, lS, lT = full_vocab_kl(h, w, h_t, w_t, targets, weights, chunk)
    kl_ref = brute_force_kl(h, w, h_t, w_t)
    torch.testing.assert_close(kl.double(), kl_ref.detach(), rtol=1e-5, atol=1e-5)
    assert (kl >= -1e-6).all()
    torch.testing.assert_close(loss.double(), (kl_ref * weights.double()).sum().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lS, naive_sampled(h, w, targets).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lT, naive_sampled(h_t, w_t, targets), rtol=1e-5, atol=1e-5)
    g_ours = grads(lambda: 3.0 * full_vocab_kl(h, w, h_t, w_t, targets, weights, chunk)[0], h, w)
    g_ref = grads(lambda: 3.0 * (brute_force_kl(h, w, h_t, w_t) * weights.double()).sum(), h, w)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def test_full_vocab_kl_is_zero_for_identical_models():
    h, w, _, _, targets = make_inputs()
    loss, kl, _, _ = full_vocab_kl(h, w, h.detach(), w.detach(), targets, torch.ones(h.shape[0]), 8)
    assert kl.abs().max() < 1e-5
    loss.backward()
    assert h.grad.abs().max() < 1e-5 and w.grad.abs().max() < 1e-5


def test_full_vocab_kl_never_differentiates_the_teacher():
    h, w, h_t, w_t, targets = make_inputs()
    h_t.requires_grad_()
    loss, *_ = full_vocab_kl(h, w, h_t, w_t, targets, torch.ones(h.shape[0]), 8)
    loss.backward()
    assert h_t.grad is None
