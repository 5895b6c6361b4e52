"""The generation interface every part of the harness samples through.

Training rollouts, in-training validation and benchmark evaluation all ask an engine the
same question: token ids in (`chat_prompts`: the chat template already applied),
completion ids, stop handling and masks out. Two engines answer it, both built by
poweropd.engines.make_engine:

    hf    Hugging Face `generate` on the model being trained (poweropd.hf_engine)
    vllm  a vLLM engine: colocated with the trainer and synced with the student after
          every update, or alone for evaluation (poweropd.vllm_engine)

This module holds only the shared types and helpers and imports no engine; the engines
import it, never the other way round.

Layout of one rollout batch (B rollouts, prompts left-padded to P, completions of T):

    input_ids_BS   [pad pad p p p p | o o o o STOP pad pad]      S = P + T
    completion_BT                    [1 1 1 1  1    0   0 ]      tokens up to the first stop
    loss_BT  (stop_token="mask")     [1 1 1 1  0    0   0 ]      what rewards / loss / N see

Tokens after the first stop token are padding, whatever the sampler produced there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


def chat_prompts(
    tokenizer, problems: list[str], instruction: str = "", enable_thinking: bool = False
) -> list[list[int]]:
    """Token ids of each problem as one user turn in the tokenizer's chat template, with the
    generation prompt added. `enable_thinking` goes to the template (Qwen3's: False appends
    an empty <think></think> block, as the paper's prompts have; docs/reference.md §3)."""
    out = []
    for problem in problems:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{problem}{instruction}"}],
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
            tokenize=True,
            return_dict=False,
        )
        out.append(list(ids))
    return out


@dataclass
class SamplingParams:
    """One sampling distribution, mapped exactly onto each engine's own parameters."""

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
    # The engine's own log-prob of each sampled token (0 on padding); vLLM reports it, HF
    # does not. Never used for the loss: the trainer recomputes every log-prob itself.
    engine_logprobs_BT: torch.Tensor | None = None

    @property
    def completion_ids_BT(self) -> torch.Tensor:
        return self.input_ids_BS[:, self.prompt_len :]

    @property
    def lengths_B(self) -> torch.Tensor:
        """Response length in tokens, stop token included."""
        return self.completion_BT.sum(-1)

    def loss_mask_BT(self, stop_token: str) -> torch.Tensor:
        """Tokens that enter rewards, loss and N.

        `mask` drops the terminal stop token of rollouts that ended with one (docs/reference.md
        §1); truncated rollouts keep every token. `raw` keeps the stop token.
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
        engine_lp = None if self.engine_logprobs_BT is None else self.engine_logprobs_BT[rows]
        return Rollouts(
            self.input_ids_BS[rows],
            self.attention_mask_BS[rows],
            self.prompt_len,
            self.completion_BT[rows],
            self.stopped_B[rows],
            engine_lp,
        )


@dataclass
class Completion:
    """One evaluation sample as the graders see it."""

    text: str
    n_tokens: int  # response length, stop token included
    truncated: bool  # hit the length limit without a stop token


class RolloutEngine(Protocol):
    """What the trainer and evaluation need from a generation engine."""

    name: str

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        """One completion per prompt (repeat a prompt for several), in prompt order."""
        ...

    def sync(self, model) -> float:
        """Make the engine sample from `model`'s current weights; returns seconds taken."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds on the accelerator while the trainer updates."""
        ...

    def close(self) -> None: ...


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


def assemble_rollouts(
    prompts: list[list[int]],
    completions: list[list[int]],
    stop_ids: list[int],
    pad_id: int,
    device: torch.device | str = "cpu",
    logprobs: list[list[float]] | None = None,
) -> Rollouts:
    """Rollouts from per-row completion token lists (an engine that returns ragged rows)."""
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    longest = max([len(c) for c in completions] + [1])
    completion_BT = torch.full((len(completions), longest), pad_id, dtype=torch.long)
    engine_lp_BT = torch.zeros((len(completions), longest)) if logprobs is not None else None
    for i, ids in enumerate(completions):
        completion_BT[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if engine_lp_BT is not None:
            engine_lp_BT[i, : len(ids)] = torch.tensor(logprobs[i], dtype=torch.float32)
    device = torch.device(device)
    ids_BP, mask_BP, completion_BT = ids_BP.to(device), mask_BP.to(device), completion_BT.to(device)
    return finish_rollouts(ids_BP, mask_BP, completion_BT, stop_ids, pad_id, engine_lp_BT)


def finish_rollouts(
    ids_BP: torch.Tensor,
    mask_BP: torch.Tensor,
    completion_BT: torch.Tensor,
    stop_ids: list[int],
    pad_id: int,
    engine_lp_BT: torch.Tensor | None = None,
) -> Rollouts:
    """Cut every completion after its first stop token and lay the batch out as above."""
    valid_BT, stopped_B = completion_masks(completion_BT, stop_ids)
    completion_BT = completion_BT.masked_fill(~valid_BT, pad_id)
    if engine_lp_BT is not None:
        engine_lp_BT = engine_lp_BT.to(completion_BT.device).masked_fill(~valid_BT, 0.0)
    input_ids_BS = torch.cat([ids_BP, completion_BT], dim=1)
    attention_mask_BS = torch.cat([mask_BP, valid_BT.long()], dim=1)
    return Rollouts(input_ids_BS, attention_mask_BS, ids_BP.shape[1], valid_BT, stopped_B, engine_lp_BT)


def decode_completions(rollouts: Rollouts, tokenizer) -> list[Completion]:
    """Response text (special tokens dropped), length and truncation of every row."""
    texts = tokenizer.batch_decode(rollouts.completion_ids_BT, skip_special_tokens=True)
    lengths, stopped = rollouts.lengths_B.tolist(), rollouts.stopped_B.tolist()
    return [Completion(text, int(n), not stop) for text, n, stop in zip(texts, lengths, stopped)]


def sample_completions(
    engine: RolloutEngine,
    tokenizer,
    prompts: list[list[int]],
    n: int,
    params: SamplingParams,
    batch_size: int,
    desc: str = "",
) -> list[list[Completion]]:
    """Evaluation sampling through any engine: per prompt, its n completions.

    Jobs go longest prompt first, so each batch pads little (and an OOM shows up at once).
    """
    from tqdm.auto import tqdm

    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    jobs.sort(key=lambda ij: -len(prompts[ij[0]]))
    out: list[list[Completion | None]] = [[None] * n for _ in prompts]
    with tqdm(total=len(jobs), desc=desc, unit="seq", leave=False) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            rollouts = engine.generate([prompts[i] for i, _ in batch], params)
            for (i, j), completion in zip(batch, decode_completions(rollouts, tokenizer)):
                out[i][j] = completion
            bar.update(len(batch))
    return out
