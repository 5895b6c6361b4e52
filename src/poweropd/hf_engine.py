"""The `hf` engine: Hugging Face `generate` behind the RolloutEngine interface.

Batched, KV-cached `generate` on the very model being trained, so it needs no weight sync.
It generates in the run's precision (the trainer passes its autocast context: bf16 on the
paper's GPU setting). The shared types (SamplingParams, Rollouts, the masks and the batch
layout) and the chat prompts live in poweropd.generation; engines are built by
poweropd.engines.make_engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from poweropd.generation import Rollouts, SamplingParams, finish_rollouts, left_pad


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
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Rollouts:
    """Sample one completion per prompt (repeat prompts for several rollouts each)."""
    gen_cfg = generation_config(params, stop_ids, pad_id)
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    width = ids_BP.shape[1]
    step = batch_size or len(prompts)
    pieces = []
    was_training = model.training
    model.eval()
    try:
        with (autocast or contextlib.nullcontext)():
            # inside the context: a sharded student's gathered weights are on the compute device
            device = next(model.parameters()).device
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
    return finish_rollouts(ids_BP.to(device), mask_BP.to(device), completion_BT, stop_ids, pad_id)


class HFEngine:
    """`generate` on the model itself: always on-policy, nothing to sync."""

    name = "hf"

    def __init__(self, model, stop_ids: list[int], pad_id: int, batch_size: int = 0, autocast=None):
        self.model, self.stop_ids, self.pad_id = model, list(stop_ids), pad_id
        self.batch_size, self.autocast = batch_size or None, autocast

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        return generate(self.model, prompts, params, self.stop_ids, self.pad_id, self.batch_size, self.autocast)

    def sync(self, model, weights=None) -> float:
        started = time.perf_counter()
        self.model = model
        return time.perf_counter() - started

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass
