"""Chunked lm-head kernels against naive full log-softmax (values and gradients, odd chunk
sizes, empty batches, low-precision weights that are never copied to fp32 as a whole)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from poweropd.logprobs import full_vocab_kl, sampled_logprobs, sampled_pg_loss


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


def power_reward(lT_N, alpha=2.0):
    """A reward that depends on the student's own (detached) log-prob, like PowerOPD's."""

    def reward_fn(lS_C, rows):
        return torch.exp(alpha * lT_N[rows]) - torch.exp(alpha * lS_C)

    return reward_fn


@pytest.mark.parametrize("chunk", [1, 3, 7, 29, 1000])
def test_fused_pg_loss_matches_naive_autograd(chunk):
    h, w, h_t, w_t, targets = make_inputs()
    lT = naive_sampled(h_t, w_t, targets)
    weights = torch.rand(h.shape[0])

    def naive_loss():
        lS = naive_sampled(h, w, targets)
        r = torch.exp(2.0 * lT) - torch.exp(2.0 * lS.detach())
        return -(weights * r * lS).sum(), lS, r

    loss, lS, r = sampled_pg_loss(h, w, targets, weights, power_reward(lT), chunk)
    loss_ref, lS_ref, r_ref = naive_loss()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lS, lS_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)
    assert not lS.requires_grad and not r.requires_grad
    g_ours = grads(lambda: 0.5 * sampled_pg_loss(h, w, targets, weights, power_reward(lT), chunk)[0], h, w)
    g_ref = grads(lambda: 0.5 * naive_loss()[0], h, w)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_pg_loss_sees_each_row_once_in_order():
    h, w, _, _, targets = make_inputs(n=10)
    seen = []

    def reward_fn(lS_C, rows):
        seen.append((rows.start, rows.stop, lS_C.shape[0]))
        return torch.ones_like(lS_C)

    sampled_pg_loss(h, w, targets, torch.ones(10), reward_fn, chunk=4)
    assert seen == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]


def test_fused_pg_loss_without_weight_grad_and_under_no_grad():
    h, w, _, _, targets = make_inputs()
    weights = torch.rand(h.shape[0])
    const = lambda lS_C, rows: torch.full_like(lS_C, 0.3)  # noqa: E731
    (gh,) = grads(lambda: sampled_pg_loss(h, w.detach(), targets, weights, const, 5)[0], h)
    (gh_ref,) = grads(lambda: -(0.3 * weights * naive_sampled(h, w.detach(), targets)).sum(), h)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss, lS, _ = sampled_pg_loss(h, w, targets, weights, const, 5)
    assert not loss.requires_grad
    torch.testing.assert_close(lS, naive_sampled(h, w, targets).detach(), rtol=1e-5, atol=1e-5)


def test_fused_pg_loss_empty_batch():
    h, w, _, _, _ = make_inputs()
    empty = torch.zeros(0, dtype=torch.long)
    loss, lS, r = sampled_pg_loss(h[:0], w, empty, torch.zeros(0), lambda lS_C, rows: lS_C, 4)
    assert loss.item() == 0.0 and lS.shape == r.shape == (0,)
    loss.backward()
    assert (w.grad == 0).all()


class FullCopies(TorchDispatchMode):
    """Records every fp32 tensor an op produces with the lm-head weight's [V, D] shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.hits = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape and t.dtype == torch.float32:
                self.hits.append(str(func))
        return out


def test_low_precision_weights_are_never_copied_to_fp32():
    """A bf16 teacher head (and a frozen bf16 student head) multiplies in bf16 chunk by chunk:
    no fp32 [V, D] copy of the weight is made, yet log-probs stay within bf16 rounding."""
    h, w, h_t, w_t, targets = make_inputs(v=97, d=12, d_t=20)
    w16, w_t16 = w.detach().bfloat16(), w_t.bfloat16()
    with FullCopies(w16.shape) as spy:
        w16.float()  # what the spy is there to catch
    assert spy.hits
    with FullCopies(w16.shape) as spy:
        lT = sampled_logprobs(h_t.bfloat16(), w_t16, targets, 8)
        _, kl, _, _ = full_vocab_kl(h.detach().bfloat16(), w16, h_t.bfloat16(), w_t16, targets, torch.ones(29), 8)
    assert spy.hits == []
    with FullCopies(w_t16.shape) as spy:
        sampled_logprobs(h_t.bfloat16(), w_t16, targets, 8)
    assert spy.hits == []
    assert lT.dtype == kl.dtype == torch.float32
    ref_lT = naive_sampled(h_t.bfloat16().float(), w_t16.float(), targets)
    torch.testing.assert_close(lT, ref_lT, rtol=0, atol=0.1)
    ref_kl = brute_force_kl(h.detach().bfloat16().float(), w16.float(), h_t.bfloat16().float(), w_t16.float())
    torch.testing.assert_close(kl.double(), ref_kl, rtol=0, atol=0.1)


def test_fp32_kernels_are_exact_at_a_realistic_vocabulary_with_a_ragged_last_chunk():
    """V = 5003 (more than one exp-sum block would need at 32k, so use a small block) and
    N = 37 tokens in chunks of 16: values and gradients of all three kernels."""
    import poweropd.logprobs as lp

    h, w, h_t, w_t, targets = make_inputs(n=37, d=16, v=5003, d_t=8, seed=3)
    block = lp.VOCAB_BLOCK
    lp.VOCAB_BLOCK = 1000  # several vocabulary blocks, the last one ragged
    try:
        weights = torch.rand(37)
        loss, kl, lS, lT = full_vocab_kl(h, w, h_t, w_t, targets, weights, 16)
        torch.testing.assert_close(kl.double(), brute_force_kl(h, w, h_t, w_t).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lT, naive_sampled(h_t, w_t, targets), rtol=1e-5, atol=1e-5)
        g_kl = grads(lambda: full_vocab_kl(h, w, h_t, w_t, targets, weights, 16)[0], h, w)
        g_ref = grads(lambda: (brute_force_kl(h, w, h_t, w_t) * weights.double()).sum(), h, w)
        for a, b in zip(g_kl, g_ref):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    finally:
        lp.VOCAB_BLOCK = block
    g_pg = grads(lambda: sampled_pg_loss(h, w, targets, weights, power_reward(lT), 16)[0], h, w)
    g_lp = grads(
        lambda: (
            sampled_logprobs(h, w, targets, 16)
            * weights
            * -power_reward(lT)(sampled_logprobs(h, w, targets, 16).detach(), slice(None))
        ).sum(),
        h,
        w,
    )
    for a, b in zip(g_pg, g_lp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix-matrix product (the lm-head matmuls)."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):  # not the KL's fp32 row dots
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2)
        return func(*args, **(kwargs or {}))


def test_under_autocast_the_head_multiplies_in_the_autocast_dtype():
    """The GPU setting (fp32 master weights, bf16 autocast), exercised on the CPU: the kernels
    multiply in bf16 like the model's own lm-head would, keep fp32 log-probs and return fp32
    gradients for fp32 weights, within bf16 rounding of the exact values."""
    h, w, h_t, w_t, targets = make_inputs()
    lT = naive_sampled(h_t, w_t, targets)
    weights = torch.rand(h.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as spy:
        loss, lS, _ = sampled_pg_loss(h, w, targets, weights, power_reward(lT), 8)
        kl_loss, kl, _, _ = full_vocab_kl(h, w, h_t, w_t, targets, weights, 8)
    assert spy.dtypes == {torch.bfloat16}  # every lm-head matmul ran in bf16
    assert lS.dtype == kl.dtype == torch.float32
    torch.testing.assert_close(lS, naive_sampled(h, w, targets).detach(), rtol=0, atol=0.1)
    torch.testing.assert_close(kl.double(), brute_force_kl(h, w, h_t, w_t).detach(), rtol=0, atol=0.1)
    for fn, ref in (
        (
            lambda: loss,
            lambda: (
                -(
                    weights
                    * power_reward(lT)(naive_sampled(h, w, targets).detach(), slice(None))
                    * naive_sampled(h, w, targets)
                ).sum()
            ),
        ),
        (lambda: kl_loss, lambda: (brute_force_kl(h, w, h_t, w_t) * weights.double()).sum()),
    ):
        got = grads(fn, h, w)
        expected = grads(ref, h, w)
        for g, e in zip(got, expected):
            assert g.dtype == torch.float32
            assert (g.double() - e.double()).abs().max() < 0.05 * e.abs().max() + 1e-3


def test_a_fused_loss_refuses_a_second_backward():
    h, w, h_t, w_t, targets = make_inputs()
    loss = full_vocab_kl(h, w, h_t, w_t, targets, torch.ones(h.shape[0]), 8)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


# ----------------------------------------------------------------------------------------
# The student's policy entropy, read off the loss pass's own chunks


def plain_first(out):
    """The loss (or, for sampled_logprobs, the log-probs) of a kernel's output."""
    return out if isinstance(out, torch.Tensor) else out[0]


def naive_entropy(h, w):
    log_p = torch.log_softmax((h @ w.T).double(), -1)
    return -(log_p.exp() * log_p).sum(-1)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _entropy_kernels(h, w, h_t, w_t, targets, weights, chunk):
    """(name, outputs without entropy, outputs with entropy) of every student-side kernel."""
    from poweropd.logprobs import generalized_jsd, teacher_topk, topk_forward_kl

    lT = naive_sampled(h_t, w_t, targets).detach()
    vals, idx, _ = teacher_topk(h_t, w_t, targets, 5, chunk)
    calls = {
        "sampled_logprobs": lambda e: sampled_logprobs(h, w, targets, chunk, entropy=e),
        "sampled_pg_loss": lambda e: sampled_pg_loss(h, w, targets, weights, power_reward(lT), chunk, entropy=e),
        "full_vocab_kl": lambda e: full_vocab_kl(h, w, h_t, w_t, targets, weights, chunk, entropy=e),
        "generalized_jsd": lambda e: generalized_jsd(h, w, h_t, w_t, targets, weights, 0.5, chunk, entropy=e),
        "topk_forward_kl": lambda e: topk_forward_kl(h, w, vals, idx, targets, weights, chunk, entropy=e),
    }
    return calls


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_every_kernel_returns_the_exact_entropy_and_the_same_values_with_it(chunk):
    """entropy=True appends H_t = -sum_v p log p (float64 reference, 1e-5) and changes nothing
    else: the other outputs and the gradients are bitwise those of entropy=False."""
    h, w, h_t, w_t, targets = make_inputs()
    weights = torch.rand(h.shape[0])
    ref = naive_entropy(h.detach(), w.detach())
    for name, call in _entropy_kernels(h, w, h_t, w_t, targets, weights, chunk).items():
        plain, with_h = call(False), call(True)
        plain = plain if isinstance(plain, tuple) else (plain,)
        assert len(with_h) == len(plain) + 1, name
        torch.testing.assert_close(with_h[-1].double(), ref, rtol=1e-5, atol=1e-5, msg=name)
        assert not with_h[-1].requires_grad, name
        for a, b in zip(plain, with_h[:-1]):
            assert torch.equal(a.detach(), b.detach()), name
        g_plain = grads(lambda call=call: plain_first(call(False)).sum(), h, w)
        g_with = grads(lambda call=call: call(True)[0].sum(), h, w)
        for a, b in zip(g_plain, g_with):
            assert torch.equal(a, b), name


def test_entropy_never_forms_a_tokens_by_vocabulary_tensor():
    """With 64 tokens in chunks of 8 over V = 3001, no op of the fused kernels makes a tensor
    larger than one [chunk, V] buffer (the [V, D] weight gradient aside: D = 12 < chunk here)."""
    import poweropd.logprobs as lp

    h, w, h_t, w_t, targets = make_inputs(n=64, d=12, v=3001, d_t=8)
    weights = torch.rand(64)
    block = lp.ENTROPY_BLOCK
    lp.ENTROPY_BLOCK = 1000  # several entropy blocks, the last one ragged
    try:
        ref = naive_entropy(h.detach(), w.detach())
        for name in ("sampled_logprobs", "sampled_pg_loss", "full_vocab_kl"):
            call = _entropy_kernels(h, w, h_t, w_t, targets, weights, 8)[name]
            with LargestTensor() as spy:
                out = call(True)
            assert spy.largest <= max(8 * 3001, w.numel()), (name, spy.largest)
            torch.testing.assert_close(out[-1].double(), ref, rtol=1e-5, atol=1e-5)
    finally:
        lp.ENTROPY_BLOCK = block


def test_entropy_of_a_uniform_and_a_peaked_head():
    v = 50
    h = torch.ones(3, 1)
    uniform = sampled_logprobs(h, torch.zeros(v, 1), torch.zeros(3, dtype=torch.long), entropy=True)[1]
    torch.testing.assert_close(uniform, torch.full((3,), math.log(v)))
    peaked_w = torch.zeros(v, 1)
    peaked_w[0] = 200.0
    peaked = sampled_logprobs(h, peaked_w, torch.zeros(3, dtype=torch.long), entropy=True)[1]
    assert peaked.abs().max() < 1e-6
