"""Chunked lm-head kernels: log-probs of sampled tokens and the exact full-vocab KL,
without ever holding a (tokens x vocabulary) tensor for the whole batch.

Inputs are the final hidden states of the N valid completion positions (hidden_ND) and
the lm-head weight (weight_VD). Tokens are processed `chunk` at a time; each chunk's
logits [chunk, V] are computed in fp32, used and dropped. On the Qwen3 vocabulary
(V = 151,936) one fp32 chunk of 1024 tokens is 0.6 GB, where the naive
log_softmax(all logits) of a 32 x 1024-token batch would be 20 GB.

Gradients:
- `sampled_logprobs` stores only its inputs and the per-token log-normaliser (N floats);
  its backward recomputes each chunk's logits (one extra lm-head matmul) instead of
  keeping them.
- `full_vocab_kl` returns a weighted scalar loss, so its gradient is known during the
  forward pass: it is formed chunk by chunk right there (grad wrt student hidden [N, D]
  and lm-head weight [V, D]) and the backward only scales it. No recomputation, no
  stored logits.
Both agree with naive log_softmax-then-gather to fp32 round-off (tests/test_logprobs.py).
"""

from __future__ import annotations

import torch


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _SampledLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, chunk):
        w32_VD = weight_VD.float()
        out_N = hidden_ND.new_empty(hidden_ND.shape[0], dtype=torch.float32)
        lse_N = torch.empty_like(out_N)
        for rows in _chunks(hidden_ND.shape[0], chunk):
            logits_CV = hidden_ND[rows].float() @ w32_VD.T
            lse_N[rows] = torch.logsumexp(logits_CV, dim=-1)
            out_N[rows] = logits_CV.gather(1, targets_N[rows, None]).squeeze(1) - lse_N[rows]
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, lse_N)
        ctx.chunk = chunk
        return out_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_ND, weight_VD, targets_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w32_VD = weight_VD.float()
        grad_h = torch.empty(hidden_ND.shape, dtype=torch.float32, device=hidden_ND.device) if need_h else None
        grad_w = torch.zeros_like(w32_VD) if need_w else None
        grad_N = grad_N.float()
        for rows in _chunks(hidden_ND.shape[0], ctx.chunk):
            h32_CD = hidden_ND[rows].float()
            # d logp(target) / d logits = onehot(target) - softmax(logits), scaled by grad.
            dlogits_CV = (h32_CD @ w32_VD.T).sub_(lse_N[rows, None]).exp_().mul_(-grad_N[rows, None])
            dlogits_CV.scatter_add_(1, targets_N[rows, None], grad_N[rows, None])
            if need_h:
                grad_h[rows] = dlogits_CV @ w32_VD
            if need_w:
                grad_w.addmm_(dlogits_CV.T, h32_CD)
        return (
            grad_h.to(hidden_ND.dtype) if need_h else None,
            grad_w.to(weight_VD.dtype) if need_w else None,
            None,
            None,
        )


def sampled_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int = 1024):
    """log softmax(hidden @ weight.T)[target] per row, fp32, differentiable in hidden and weight."""
    with torch.autocast(hidden_ND.device.type, enabled=False):
        return _SampledLogprobs.apply(hidden_ND, weight_VD, targets_N, chunk)


class _FullVocabKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hS_ND, wS_VD, hT_ND, wT_VD, targets_N, weights_N, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wS32, wT32 = wS_VD.float(), wT_VD.float()
        n = hS_ND.shape[0]
        kl_N = hS_ND.new_empty(n, dtype=torch.float32)
        lS_N, lT_N = torch.empty_like(kl_N), torch.empty_like(kl_N)
        grad_h = torch.empty(hS_ND.shape, dtype=torch.float32, device=hS_ND.device) if need_h else None
        grad_w = torch.zeros_like(wS32) if need_w else None
        weights_N = weights_N.float()
        for rows in _chunks(n, chunk):
            hS32 = hS_ND[rows].float()
            logpS_CV = torch.log_softmax(hS32 @ wS32.T, dim=-1)
            logpT_CV = torch.log_softmax(hT_ND[rows].float() @ wT32.T, dim=-1)
            lS_N[rows] = logpS_CV.gather(1, targets_N[rows, None]).squeeze(1)
            lT_N[rows] = logpT_CV.gather(1, targets_N[rows, None]).squeeze(1)
            pS_CV = logpS_CV.exp()
            diff_CV = logpS_CV.sub_(logpT_CV)  # log pS - log pT, in the log pS buffer
            del logpT_CV
            kl_C = (pS_CV[:, None, :] @ diff_CV[:, :, None]).view(-1)  # row-wise dot, no temp
            kl_N[rows] = kl_C
            if need_h or need_w:
                # d KL / d logits_S = pS * (log pS - log pT - KL)
                dlogits_CV = diff_CV.sub_(kl_C[:, None]).mul_(pS_CV).mul_(weights_N[rows, None])
                if need_h:
                    grad_h[rows] = dlogits_CV @ wS32
                if need_w:
                    grad_w.addmm_(dlogits_CV.T, hS32)
        loss = (kl_N * weights_N).sum()
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.dtypes = (hS_ND.dtype, wS_VD.dtype)
        ctx.mark_non_differentiable(kl_N, lS_N, lT_N)
        return loss, kl_N, lS_N, lT_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ls, _grad_lt):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (
            (grad_h * grad_loss).to(ctx.dtypes[0]) if need_h else None,
            (grad_w * grad_loss).to(ctx.dtypes[1]) if need_w else None,
            None,
            None,
            None,
            None,
            None,
        )


def full_vocab_kl(
    hS_ND: torch.Tensor,
    wS_VD: torch.Tensor,
    hT_ND: torch.Tensor,
    wT_VD: torch.Tensor,
    targets_N: torch.Tensor,
    weights_N: torch.Tensor,
    chunk: int = 1024,
):
    """Exact reverse KL over the whole vocabulary, per token, in chunks.

    KL_t = sum_v pS(v|c_t) (log pS(v|c_t) - log pT(v|c_t))   (KL(student || teacher))

    Returns (loss, kl_N, lS_N, lT_N): loss = sum_t weights_t KL_t with the exact gradient
    through the whole student distribution (teacher side is constant); kl_N and the
    sampled tokens' log-probs lS_N / lT_N come for free and carry no gradient.
    """
    with torch.autocast(hS_ND.device.type, enabled=False):
        return _FullVocabKL.apply(hS_ND, wS_VD, hT_ND.detach(), wT_VD.detach(), targets_N, weights_N, chunk)
