"""Student rollouts: chat-formatted prompts in, left-padded token batches and masks out.

Layout of one rollout batch (B rollouts, prompts left-padded to P, completions of T):

    input_ids_BS   [pad pad p p p p | o o o o STOP pad pad]      S = P + T
    completion_BT                    [1 1 1 1  1    0   0 ]      tokens up to the first stop
    loss_BT  (stop_token="mask")     [1 1 1 1  0    0   0 ]      what rewards / loss / N see

Tokens after the first stop token are padding, whatever the sampler produced there.
Generation is Hugging Face `generate` (KV cache, batched, finished rows stop early).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    greedy: bool = False


@dataclass
class Rollouts:
    input_ids_BS: torch.Tensor  # prompt (left-padded) followed by completion
    attention_mask_BS: torch.Tensor  # 1 on real prompt tokens and on completion_BT
    prompt_len: int  # P: completion token t sits at column P + t
    completion_BT: torch.Tensor  # bool, valid completion tokens (stop token included)
    stopped_B: torch.Tensor  # bool, the completion ended with a stop token

    @property
    def completion_ids_BT(self) -> torch.Tensor:
        return self.input_ids_BS[:, self.prompt_len :]

    @property
    def lengths_B(self) -> torch.Tensor:
        """Response length in tokens, stop token included."""
        return self.completion_BT.sum(-1)

    def loss_mask_BT(self, stop_token: str) -> torch.Tensor:
        """Tokens that enter rewards, loss and N.

        `mask` drops the terminal stop token of rollouts that ended with one (REFERENCE
        section 1); truncated rollouts keep every token. `raw` keeps the stop token.
        """
        if stop_token == "raw":
            return self.completion_BT
        if stop_token != "mask":
            raise ValueError(f"unknown stop_token mode {stop_token!r}; valid: mask, raw")
        last_B = (self.lengths_B - 1).clamp(min=0)
        is_last_BT = torch.zeros_like(self.completion_BT)
        is_last_BT.scatter_(1, last_B[:, None], self.stopped_B[:, None])
        return self.completion_BT & ~is_last_BT

    def select(self, rows: slice) -> Rollouts:
        return Rollouts(
            self.input_ids_BS[rows],
            self.attention_mask_BS[rows],
            self.prompt_len,
            self.completion_BT[rows],
            self.stopped_B[rows],
        )


def chat_prompts(tokenizer, problems: list[str], instruction: str = "") -> list[list[int]]:
    """Token ids of each problem in the student's chat template (enable_thinking=False)."""
    out = []
    for problem in problems:
        content = f"{problem}{instruction}"
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            enable_thinking=False,
            tokenize=True,
            return_dict=False,
        )
        out.append(list(ids))
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_BP[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask_BP[i, width - len(p) :] = 1
    return ids_BP, mask_BP


def completion_masks(completion_ids_BT: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid_BT, stopped_B): tokens up to and including the first stop token."""
    is_stop_BT = torch.isin(completion_ids_BT, torch.tensor(stop_ids, device=completion_ids_BT.device))
    # Number of stop tokens strictly before each position; valid while that is zero.
    stops_before_BT = is_stop_BT.long().cumsum(-1) - is_stop_BT.long()
    return stops_before_BT == 0, is_stop_BT.any(-1)


def generation_config(params: SamplingParams, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    common = dict(
        max_new_tokens=params.max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    if params.greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        # 0 disables top-k; None would silently fall back to transformers' default of 50.
        top_k=params.top_k,
        **common,
    )


def neutralize_generation_defaults(model) -> None:
    """Forget the checkpoint's generation_config.json (Qwen3 ships temperature 0.6, top_k 20;
    others add repetition penalties), whose fields `generate` would otherwise merge into
    ours: rollouts must come from exactly the configured sampling distribution."""
    model.generation_config = GenerationConfig()


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: list[int],
    pad_id: int,
    batch_size: int | None = None,
) -> Rollouts:
    """Sample one completion per prompt (repeat prompts for several rollouts each)."""
    device = next(model.parameters()).device
    gen_cfg = generation_config(params, stop_ids, pad_id)
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    width = ids_BP.shape[1]
    step = batch_size or len(prompts)
    pieces = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), step):
            rows = slice(start, start + step)
            out = model.generate(
                input_ids=ids_BP[rows].to(device),
                attention_mask=mask_BP[rows].to(device),
                generation_config=gen_cfg,
            )
            pieces.append(out[:, width:])
    finally:
        model.train(was_training)
    longest = max(p.shape[1] for p in pieces)
    completion_BT = torch.cat([torch.nn.functional.pad(p, (0, longest - p.shape[1]), value=pad_id) for p in pieces])
    valid_BT, stopped_B = completion_masks(completion_BT, stop_ids)
    completion_BT = completion_BT.masked_fill(~valid_BT, pad_id)
    input_ids_BS = torch.cat([ids_BP.to(device), completion_BT], dim=1)
    attention_mask_BS = torch.cat([mask_BP.to(device), valid_BT.long()], dim=1)
    return Rollouts(input_ids_BS, attention_mask_BS, width, valid_BT, stopped_B)
