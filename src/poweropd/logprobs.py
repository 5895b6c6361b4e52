"""Chunked lm-head kernels: log-probs of sampled tokens, the OPD policy-gradient loss and
the exact full-vocab KL, without ever holding a (tokens x vocabulary) tensor for the
whole batch.

Inputs are the final hidden states of the N valid completion positions (hidden_ND; prompt
positions never reach the lm-head) and the lm-head weight (weight_VD). Tokens are handled
`chunk` at a time; each chunk's logits [chunk, V] are formed in fp32, used in place and
dropped. On the Qwen3 vocabulary (V = 151,936) one fp32 chunk of 1024 tokens is 0.6 GB,
where the naive log_softmax of a 32 x 1024-token batch would be 20 GB.

Five kernels, all exact (tests/test_logprobs.py and tests/test_objectives.py compare them
with naive autograd); the first three:

- `sampled_logprobs`: log pi(token) per row, differentiable. Stores only its inputs and
  the per-token log-normaliser (N floats); the backward recomputes each chunk's logits (one
  extra lm-head matmul) instead of keeping them. One [chunk, V] buffer at a time.
  Used for the teacher (no grad), z-scored rewards and anything else that needs log-probs
  before it knows its loss.
- `sampled_pg_loss`: the OPD loss -sum_t w_t sg[r_t] log pi(token_t) with rewards
  r_t = reward_fn(sg[log pi(token_t)]) computed chunk by chunk. The upstream gradient of
  each log-prob (-w_t r_t) is known as soon as the chunk's log-prob is, so the gradient wrt
  the hidden states and the lm-head is formed right there from the softmax the forward
  already holds: no recomputation, one [chunk, V] buffer, one exp pass.
- `full_vocab_kl`: weighted KL(student || teacher) over the whole vocabulary, its gradient
  formed in the forward as well. Two [chunk, V] buffers (student and teacher log-probs,
  reused in place for the softmax and the logit gradient), which is the least the exact
  KL needs without splitting the vocabulary.

Every student-side kernel can also return the policy entropy of each position,
H_t = -sum_v pi(v|c_t) log pi(v|c_t) (`entropy=True`), read off the same [chunk, V] buffer
while it is exponentiated (`_exp_plogp_`): no extra model pass, no extra [chunk, V] buffer,
only [chunk, ENTROPY_BLOCK] temporaries and one multiply-add pass over the vocabulary.

The vocabulary objectives beyond the paper (poweropd.objectives) add `generalized_jsd`
(TRL's generalised JSD) and `topk_forward_kl` (verl's top-k forward KL, fed by
`teacher_topk`), each run one chunk at a time inside torch.utils.checkpoint.

Precision: logits, normalisers and every reduction are fp32. Weights are never copied to
fp32 as a whole: a bf16 lm-head multiplies in bf16 (fp32 output on CUDA, as Hugging Face's
own bf16 forward then upcasts on other devices), and under autocast the operands take the
autocast dtype, exactly as the model's own lm-head would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

VOCAB_BLOCK = 32768  # columns per exp-sum block when a normaliser must not destroy its logits
ENTROPY_BLOCK = 8192  # columns per block when the entropy is read off an exponentiation


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's own lm-head would multiply in (autocast's, else the weight's)."""
    device_type = weight.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


_CUDA_OUT_DTYPE = True  # torch.mm(..., out_dtype=fp32) for bf16/fp16 operands (CUDA only)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result. Operands share a dtype; low-precision ones multiply in it."""
    global _CUDA_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _CUDA_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _CUDA_OUT_DTYPE = False
    return (a @ b).float()


def _logits(h_CD: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    """fp32 logits [C, V] of one chunk (w_VD already in the compute dtype)."""
    return _mm32(h_CD.to(w_VD.dtype), w_VD.T)


def _gather(x_CV: torch.Tensor, t_C: torch.Tensor) -> torch.Tensor:
    return x_CV.gather(1, t_C[:, None]).squeeze(1)


def _lse_keep(x_CV: torch.Tensor) -> torch.Tensor:
    """logsumexp over the vocabulary without destroying x and without a second [C, V] buffer."""
    m_C = x_CV.amax(-1)
    s_C = torch.zeros_like(m_C)
    for cols in _chunks(x_CV.shape[1], VOCAB_BLOCK):
        s_C += (x_CV[:, cols] - m_C[:, None]).exp_().sum(-1)
    return m_C + s_C.log()


def _exp_plogp_(y_CV: torch.Tensor) -> torch.Tensor:
    """Exponentiates y in place, block by block, and returns sum_v exp(y_v) * y_v per row: the
    entropy's numerator, for the price of one multiply-add pass (the exp values are bitwise
    those of y.exp_())."""
    acc_C = y_CV.new_zeros(y_CV.shape[0])
    for cols in _chunks(y_CV.shape[1], ENTROPY_BLOCK):
        block = y_CV[:, cols]
        e = block.exp()
        acc_C += (e * block).sum(-1)
        block.copy_(e)
    return acc_C


def _softmax_inplace(logits_CV: torch.Tensor, entropy: bool = False):
    """Turns logits into softmax probabilities in place; returns (probs_CV, lse_C, entropy_C or None)."""
    m_C = logits_CV.amax(-1)
    y_CV = logits_CV.sub_(m_C[:, None])
    plogp_C = _exp_plogp_(y_CV) if entropy else None  # sum_v e_v y_v with e = exp(y)
    probs_CV = y_CV if entropy else y_CV.exp_()
    s_C = probs_CV.sum(-1)
    probs_CV.div_(s_C[:, None])
    log_s_C = s_C.log()
    # H = -sum p log p with p = e / s, log p = y - log s:  H = log s - sum(e y) / s
    return probs_CV, m_C + log_s_C, None if plogp_C is None else log_s_C - plogp_C / s_C


def _accumulate(dlogits_CV, h_CD, w_VD, rows, grad_h, grad_w) -> None:
    """grad_h[rows] = dlogits @ W and grad_w += dlogits.T @ h (fp32 accumulators)."""
    if grad_h is not None:
        grad_h[rows] = _mm32(dlogits_CV.to(w_VD.dtype), w_VD)
    if grad_w is not None:
        if w_VD.dtype == torch.float32:
            grad_w.addmm_(dlogits_CV.T, h_CD.float())
        else:
            grad_w += dlogits_CV.T.to(w_VD.dtype) @ h_CD.to(w_VD.dtype)


def _grad_buffers(ctx, hidden_ND, weight_VD):
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = hidden_ND.new_empty(hidden_ND.shape, dtype=torch.float32) if need_h else None
    grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
    return grad_h, grad_w


def _save_grads(ctx, hidden_ND, weight_VD, grad_h, grad_w) -> None:
    # Kept as plain attributes, not saved tensors: the backward scales them in place and
    # hands them over, so the [V, D] weight gradient exists once, not twice.
    ctx.grads = (grad_h, grad_w)
    ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype)


def _scaled_grads(ctx, grad_loss) -> tuple:
    if ctx.grads is None:
        raise RuntimeError(
            "the fused lm-head loss was differentiated twice; its gradient is handed over by the first "
            "backward, so compute the loss again instead of using retain_graph"
        )
    (grad_h, grad_w), ctx.grads = ctx.grads, None
    return tuple(None if g is None else g.mul_(grad_loss).to(dtype) for g, dtype in zip((grad_h, grad_w), ctx.dtypes))


# ----------------------------------------------------------------------------------------
# log-probs of the sampled tokens (recompute in backward)


class _SampledLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, chunk, compute_dtype, entropy):
        w_VD = weight_VD.to(compute_dtype)
        out_N = hidden_ND.new_empty(hidden_ND.shape[0], dtype=torch.float32)
        lse_N = torch.empty_like(out_N)
        ent_N = torch.empty_like(out_N) if entropy else out_N.new_empty(0)
        for rows in _chunks(hidden_ND.shape[0], chunk):
            logits_CV = _logits(hidden_ND[rows], w_VD)
            target_C = _gather(logits_CV, targets_N[rows])
            m_C = logits_CV.amax(-1)
            y_CV = logits_CV.sub_(m_C[:, None])
            plogp_C = _exp_plogp_(y_CV) if entropy else None  # y becomes exp(y) either way
            s_C = (y_CV if entropy else y_CV.exp_()).sum(-1)
            lse_N[rows] = m_C + s_C.log()
            if entropy:
                ent_N[rows] = s_C.log() - plogp_C / s_C
            out_N[rows] = target_C - lse_N[rows]
            del logits_CV  # before the next chunk's logits exist: one [chunk, V] buffer at a time
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, lse_N)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        ctx.mark_non_differentiable(ent_N)
        return out_N, ent_N

    @staticmethod
    def backward(ctx, grad_N, _grad_ent):
        hidden_ND, weight_VD, targets_N, lse_N = ctx.saved_tensors
        w_VD = weight_VD.to(ctx.compute_dtype)
        grad_h, grad_w = _grad_buffers(ctx, hidden_ND, weight_VD)
        grad_N = grad_N.float()
        for rows in _chunks(hidden_ND.shape[0], ctx.chunk):
            # d logp(target) / d logits = onehot(target) - softmax(logits), times the upstream grad.
            dlogits_CV = _logits(hidden_ND[rows], w_VD).sub_(lse_N[rows, None]).exp_().mul_(-grad_N[rows, None])
            dlogits_CV.scatter_add_(1, targets_N[rows, None], grad_N[rows, None])
            _accumulate(dlogits_CV, hidden_ND[rows], w_VD, rows, grad_h, grad_w)
            del dlogits_CV
        return (
            grad_h.to(hidden_ND.dtype) if grad_h is not None else None,
            grad_w.to(weight_VD.dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


def sampled_logprobs(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    chunk: int = 1024,
    entropy: bool = False,
):
    """log softmax(hidden @ weight.T)[target] per row, fp32, differentiable in hidden and weight.
    With `entropy`: (log-probs, entropy_N), the entropy carrying no gradient."""
    dtype = _compute_dtype(weight_VD)
    with torch.autocast(hidden_ND.device.type, enabled=False):
        out_N, ent_N = _SampledLogprobs.apply(hidden_ND, weight_VD, targets_N, chunk, dtype, entropy)
    return (out_N, ent_N) if entropy else out_N


# ----------------------------------------------------------------------------------------
# the OPD policy-gradient loss, gradient formed in the forward


class _SampledPGLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, weights_N, reward_fn, chunk, compute_dtype, entropy):
        w_VD = weight_VD.to(compute_dtype)
        n = hidden_ND.shape[0]
        lS_N = hidden_ND.new_empty(n, dtype=torch.float32)
        r_N = torch.empty_like(lS_N)
        ent_N = torch.empty_like(lS_N) if entropy else lS_N.new_empty(0)
        grad_h, grad_w = _grad_buffers(ctx, hidden_ND, weight_VD)
        weights_N = weights_N.float()
        for rows in _chunks(n, chunk):
            t_C = targets_N[rows]
            logits_CV = _logits(hidden_ND[rows], w_VD)
            target_C = _gather(logits_CV, t_C)
            probs_CV, lse_C, ent_C = _softmax_inplace(logits_CV, entropy)
            if entropy:
                ent_N[rows] = ent_C
            lS_N[rows] = target_C - lse_C
            r_N[rows] = reward_fn(lS_N[rows], rows)
            if grad_h is not None or grad_w is not None:
                # loss = -sum w r lS  ->  d loss / d logits = -w r (onehot - softmax)
                coef_C = weights_N[rows] * r_N[rows]
                dlogits_CV = probs_CV.mul_(coef_C[:, None])
                dlogits_CV.scatter_add_(1, t_C[:, None], -coef_C[:, None])
                _accumulate(dlogits_CV, hidden_ND[rows], w_VD, rows, grad_h, grad_w)
                del dlogits_CV
            del logits_CV, probs_CV  # one [chunk, V] buffer at a time
        _save_grads(ctx, hidden_ND, weight_VD, grad_h, grad_w)
        ctx.mark_non_differentiable(lS_N, r_N, ent_N)
        return -(weights_N * r_N * lS_N).sum(), lS_N, r_N, ent_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_lS, _grad_r, _grad_ent):
        return (*_scaled_grads(ctx, grad_loss), None, None, None, None, None, None)


def sampled_pg_loss(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    weights_N: torch.Tensor,
    reward_fn: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk: int = 1024,
    entropy: bool = False,
):
    """OPD loss with stop-gradient token rewards, fused with the lm-head.

    loss = -sum_t w_t r_t lS_t,   lS_t = log pi(token_t),   r_t = reward_fn(sg[lS_C], rows)

    `reward_fn` gets the fp32 log-probs of one chunk and the slice of rows it covers and
    returns that chunk's rewards (it must not need other chunks: z-scored rewards go through
    `sampled_logprobs`). Returns (loss, lS_N, r_N), plus entropy_N with `entropy`; only the
    loss carries gradient, and it equals autograd through log_softmax-then-gather of the same loss.
    """
    dtype = _compute_dtype(weight_VD)
    with torch.autocast(hidden_ND.device.type, enabled=False):
        out = _SampledPGLoss.apply(hidden_ND, weight_VD, targets_N, weights_N, reward_fn, chunk, dtype, entropy)
    return out if entropy else out[:3]


# ----------------------------------------------------------------------------------------
# exact full-vocab KL(student || teacher)


class _FullVocabKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hS_ND, wS_VD, hT_ND, wT_VD, targets_N, weights_N, chunk, dtype_S, dtype_T, entropy):
        wS, wT = wS_VD.to(dtype_S), wT_VD.to(dtype_T)
        n = hS_ND.shape[0]
        kl_N = hS_ND.new_empty(n, dtype=torch.float32)
        lS_N, lT_N = torch.empty_like(kl_N), torch.empty_like(kl_N)
        ent_N = torch.empty_like(kl_N) if entropy else kl_N.new_empty(0)
        grad_h, grad_w = _grad_buffers(ctx, hS_ND, wS_VD)
        weights_N = weights_N.float()
        for rows in _chunks(n, chunk):
            t_C = targets_N[rows]
            logpS_CV = _logits(hS_ND[rows], wS)
            logpS_CV.sub_(_lse_keep(logpS_CV)[:, None])
            lS_N[rows] = _gather(logpS_CV, t_C)
            diff_CV = _logits(hT_ND[rows], wT)  # teacher logits -> log pT -> log pS - log pT
            diff_CV.sub_(_lse_keep(diff_CV)[:, None])
            lT_N[rows] = _gather(diff_CV, t_C)
            diff_CV.neg_().add_(logpS_CV)
            if entropy:  # H = -sum pS log pS, read off while log pS becomes pS
                ent_N[rows] = _exp_plogp_(logpS_CV).neg_()
                pS_CV = logpS_CV
            else:
                pS_CV = logpS_CV.exp_()
            kl_C = torch.bmm(pS_CV[:, None, :], diff_CV[:, :, None]).view(-1)  # row-wise dot, no temp
            kl_N[rows] = kl_C
            if grad_h is not None or grad_w is not None:
                # d KL / d logits_S = pS * (log pS - log pT - KL)
                dlogits_CV = diff_CV.sub_(kl_C[:, None]).mul_(pS_CV).mul_(weights_N[rows, None])
                _accumulate(dlogits_CV, hS_ND[rows], wS, rows, grad_h, grad_w)
                del dlogits_CV
            del logpS_CV, pS_CV, diff_CV  # two [chunk, V] buffers at a time, never more
        _save_grads(ctx, hS_ND, wS_VD, grad_h, grad_w)
        ctx.mark_non_differentiable(kl_N, lS_N, lT_N, ent_N)
        return (kl_N * weights_N).sum(), kl_N, lS_N, lT_N, ent_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ls, _grad_lt, _grad_ent):
        return (*_scaled_grads(ctx, grad_loss), None, None, None, None, None, None, None, None)


def full_vocab_kl(
    hS_ND: torch.Tensor,
    wS_VD: torch.Tensor,
    hT_ND: torch.Tensor,
    wT_VD: torch.Tensor,
    targets_N: torch.Tensor,
    weights_N: torch.Tensor,
    chunk: int = 1024,
    entropy: bool = False,
):
    """Exact reverse KL over the whole vocabulary, per token, in chunks.

    KL_t = sum_v pS(v|c_t) (log pS(v|c_t) - log pT(v|c_t))   (KL(student || teacher))

    Returns (loss, kl_N, lS_N, lT_N): loss = sum_t weights_t KL_t with the exact gradient
    through the whole student distribution (teacher side is constant); kl_N and the
    sampled tokens' log-probs lS_N / lT_N come for free and carry no gradient (with `entropy`,
    the student's entropy_N as a fifth output).
    """
    dtype_S = _compute_dtype(wS_VD)
    dtype_T = wT_VD.dtype if dtype_S == wS_VD.dtype else dtype_S
    with torch.autocast(hS_ND.device.type, enabled=False):
        out = _FullVocabKL.apply(
            hS_ND, wS_VD, hT_ND.detach(), wT_VD.detach(), targets_N, weights_N, chunk, dtype_S, dtype_T, entropy
        )
    return out if entropy else out[:4]


# ----------------------------------------------------------------------------------------
# Generalised JSD (TRL) and top-k forward KL (verl): chunked, checkpointed per chunk
#
# These two need the student's whole distribution but have no closed-form gradient as
# compact as the KL's, so they run the divergence under autograd one chunk at a time inside
# torch.utils.checkpoint: the forward keeps only each chunk's inputs (hidden rows) and the
# per-token values; the backward recomputes the chunk (logits, log-softmax, divergence) and
# back-propagates it, then drops it. Peak: the autograd intermediates of ONE chunk (a handful
# of [chunk, V] fp32 tensors; lower training.logprob_chunk_size if that is too much), never
# [tokens, V]. The teacher side carries no gradient.


def jsd_rows(lS_CV: torch.Tensor, lT_CV: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per row, with TRL's conventions:

        beta = 0:      KL(P_T || P_S)                                   forward KL
        beta = 1:      KL(P_S || P_T)                                   reverse KL
        0 < beta < 1:  beta KL(P_T || M) + (1 - beta) KL(P_S || M),     M = beta P_T + (1 - beta) P_S

    (The interior expression tends to 0 at both ends; the two KLs are the endpoint cases,
    as in TRL's generalized_jsd_loss.) Inputs are log-probs; the result is fp32 [C]."""
    if beta == 0:
        return (lT_CV.exp() * (lT_CV - lS_CV)).sum(-1)
    if beta == 1:
        return (lS_CV.exp() * (lS_CV - lT_CV)).sum(-1)
    lM_CV = torch.logaddexp(lT_CV + math.log(beta), lS_CV + math.log1p(-beta))
    kl_T = (lT_CV.exp() * (lT_CV - lM_CV)).sum(-1)
    kl_S = (lS_CV.exp() * (lS_CV - lM_CV)).sum(-1)
    return beta * kl_T + (1 - beta) * kl_S


def topk_kl_rows(lS_CV: torch.Tensor, topk_lT_CK: torch.Tensor, topk_idx_CK: torch.Tensor) -> torch.Tensor:
    """Forward KL restricted to the teacher's top-k tokens, NOT renormalised:

        sum_{v in topk_T} P_T(v) (log P_T(v) - log P_S(v))

    with both log-probs normalised over the whole vocabulary. k = V is the exact forward KL.
    Why no renormalisation: the gradient wrt the student's logits is m_k times that of the
    renormalised version (m_k = the teacher's top-k mass at that position), so both have the
    same fixed point (P_S = the teacher's top-k renormalised); keeping the raw mass weights
    each position by how much of the teacher the top-k actually covers, and keeps k = V
    equal to the full forward KL."""
    lS_CK = lS_CV.gather(1, topk_idx_CK)
    return (topk_lT_CK.exp() * (topk_lT_CK - lS_CK)).sum(-1)


def _student_logprobs(h_CD: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(_logits(h_CD, w_VD), dim=-1)


def _entropy_rows(l_CV: torch.Tensor) -> torch.Tensor:
    """-sum_v p log p per row of log-probs, no gradient (a row-wise dot: no [C, V] temporary
    beyond the exp)."""
    with torch.no_grad():
        return -torch.bmm(l_CV.exp()[:, None, :], l_CV[:, :, None]).view(-1)


def _jsd_chunk(h_CD, w_VD, hT_CD, wT_VD, targets_C, weights_C, beta, entropy):
    lS_CV = _student_logprobs(h_CD, w_VD)
    with torch.no_grad():
        lT_CV = torch.log_softmax(_logits(hT_CD, wT_VD), dim=-1)
    d_C = jsd_rows(lS_CV, lT_CV, beta)
    lS_C, lT_C = _gather(lS_CV, targets_C).detach(), _gather(lT_CV, targets_C)
    ent_C = _entropy_rows(lS_CV.detach()) if entropy else lS_C.new_zeros(0)
    return (d_C * weights_C).sum(), d_C.detach(), lS_C, lT_C, ent_C


def _topk_chunk(h_CD, w_VD, topk_lT_CK, topk_idx_CK, targets_C, weights_C, entropy):
    lS_CV = _student_logprobs(h_CD, w_VD)
    d_C = topk_kl_rows(lS_CV, topk_lT_CK, topk_idx_CK)
    ent_C = _entropy_rows(lS_CV.detach()) if entropy else d_C.new_zeros(0)
    return (d_C * weights_C).sum(), d_C.detach(), _gather(lS_CV, targets_C).detach(), ent_C


def _checkpointed(fn, *args):
    from torch.utils.checkpoint import checkpoint

    if torch.is_grad_enabled() and any(a.requires_grad for a in args if isinstance(a, torch.Tensor)):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _concat(parts: list[tuple], first: int, n_out: int, empty_like: torch.Tensor) -> list[torch.Tensor]:
    """Per-token outputs `first..` of each chunk's tuple, concatenated (zero-length when no chunk)."""
    if not parts:
        return [empty_like.new_zeros(0, dtype=torch.float32) for _ in range(n_out)]
    return [torch.cat([p[i] for p in parts]) for i in range(first, first + n_out)]


def generalized_jsd(
    hS_ND, wS_VD, hT_ND, wT_VD, targets_N, weights_N, beta: float, chunk: int = 1024, entropy: bool = False
):
    """sum_t w_t JSD_beta(P_T(.|c_t), P_S(.|c_t)) over the whole vocabulary, in chunks.

    Returns (loss, jsd_N, lS_N, lT_N), plus the student's entropy_N with `entropy`: gradient
    through the whole student distribution (including its share of the mixture M); the
    teacher is stop-gradient; the per-token outputs carry no gradient."""
    dtype_S = _compute_dtype(wS_VD)
    wS, wT = wS_VD.to(dtype_S), wT_VD.detach().to(dtype_S)
    # 0 x the inputs: a micro-batch without tokens still back-propagates (zeros)
    loss, parts = (hS_ND.sum() * 0.0).float(), []
    with torch.autocast(hS_ND.device.type, enabled=False):
        for rows in _chunks(hS_ND.shape[0], chunk):
            out = _checkpointed(
                _jsd_chunk,
                hS_ND[rows],
                wS,
                hT_ND[rows].detach(),
                wT,
                targets_N[rows],
                weights_N[rows].float(),
                beta,
                entropy,
            )
            loss = loss + out[0]
            parts.append(out)
    return loss, *_concat(parts, 1, 4 if entropy else 3, hS_ND)


def topk_forward_kl(
    hS_ND, wS_VD, topk_lT_NK, topk_idx_NK, targets_N, weights_N, chunk: int = 1024, entropy: bool = False
):
    """sum_t w_t sum_{v in topk_T(c_t)} P_T(v) (log P_T(v) - log P_S(v)), in chunks; needs only
    the teacher's top-k log-probs and indices per position (`teacher_topk`).
    Returns (loss, kl_N, lS_N), plus the student's entropy_N with `entropy`."""
    dtype_S = _compute_dtype(wS_VD)
    wS = wS_VD.to(dtype_S)
    loss, parts = (hS_ND.sum() * 0.0).float(), []
    with torch.autocast(hS_ND.device.type, enabled=False):
        for rows in _chunks(hS_ND.shape[0], chunk):
            out = _checkpointed(
                _topk_chunk,
                hS_ND[rows],
                wS,
                topk_lT_NK[rows],
                topk_idx_NK[rows],
                targets_N[rows],
                weights_N[rows].float(),
                entropy,
            )
            loss = loss + out[0]
            parts.append(out)
    return loss, *_concat(parts, 1, 3 if entropy else 2, hS_ND)


@torch.no_grad()
def teacher_topk(hT_ND: torch.Tensor, wT_VD: torch.Tensor, targets_N: torch.Tensor, k: int, chunk: int = 1024):
    """The teacher's top-k log-probs and token ids per position ([N, k] each), plus the
    sampled tokens' log-probs lT_N; one [chunk, V] buffer at a time."""
    w = wT_VD.to(_compute_dtype(wT_VD))
    k = min(k, w.shape[0])
    vals, idx, lT = [], [], []
    for rows in _chunks(hT_ND.shape[0], chunk):
        l_CV = _logits(hT_ND[rows], w)
        l_CV.sub_(_lse_keep(l_CV)[:, None])
        lT.append(_gather(l_CV, targets_N[rows]))
        v, i = l_CV.topk(k, dim=-1)
        vals.append(v)
        idx.append(i)
        del l_CV
    if not lT:
        empty = hT_ND.new_zeros((0, k), dtype=torch.float32)
        return empty, empty.long(), hT_ND.new_zeros(0, dtype=torch.float32)
    return torch.cat(vals), torch.cat(idx), torch.cat(lT)
