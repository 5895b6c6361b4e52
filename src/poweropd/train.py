"""The one OPD trainer shared by every objective (docs/reference.md §1).

One update is `opd_step` (sampling) then `opd_update` (the rest), top to bottom:

    prompts --student samples--> rollouts (left-padded prompt | completion up to stop)
            --teacher scores the same ids (no grad)--> what the objective needs: lT_t
              (sampled-token objectives), + its top-k (topk_kl), or its hidden states
              (full_vocab, jsd)
            --objective.micro_loss per micro-batch (poweropd.objectives)--> e.g. the paper's
              loss = -(1/N) sum_t sg[r_t] lS_t,  r_t = f(lT_t, sg[lS_t]),  N = valid tokens
              of the whole batch (all processes)
            --backward--> clip at max_grad_norm (the pre-clip norm is logged) --> AdamW step
            --> statistics from tensors already in hand

With the paper's objectives there is no reward-to-go, baseline, PPO ratio, importance
weight, KL-to-reference or entropy bonus: one optimizer update per batch of fresh
rollouts. reward.gamma / reward.task_weight (beyond the paper, docs/objectives.md) add a
discounted return or a task reward to the same policy gradient.

Data parallel: run under `accelerate launch` or `torchrun`; each process samples its share
of the batch and every normaliser (N, the z-score moments, the sequence count) is summed
over processes first, so the gradient is the same global token mean as on one device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from poweropd.checkpoint import (
    AccelerateState,
    ShardedState,
    latest_checkpoint,
    resume_from_newest,
    rng_state,
    save_checkpoint,
    set_rng_state,
    weights_finite,
)
from poweropd.config import Config
from poweropd.data import PromptSampler, bound_prompts, train_rows, val_rows
from poweropd.engines import make_engine
from poweropd.errors import ConfigError
from poweropd.files import read_json_object, read_jsonl_lenient, write_json_atomic
from poweropd.generation import RolloutEngine, Rollouts, SamplingParams, chat_prompts
from poweropd.grading import Grader
from poweropd.models import ModelPair, StudentScorer, load_pair
from poweropd.objectives import MicroBatch, MicroLoss, Objective, TeacherOut, get_objective
from poweropd.rewards import masked_moments, task_advantage, zscore
from poweropd.stats import StepClock, any_process, gather_tokens, position_stats, summarize
from poweropd.teacher_client import TeacherFailure
from poweropd.teachers import HFTeacher, open_teacher
from poweropd.tracking import (
    FINAL_MODEL,
    HYDRA_OWN,
    METRICS,
    REWARD_DUMP,
    REWARD_DUMP_ROLLOUTS,
    RUN_CONFIG,
    SUMMARY,
    RunLock,
    Tracker,
    flatten,
)

log = logging.getLogger(__name__)

MAX_EMPTY_BATCHES = 5  # consecutive batches without a single valid token: the policy collapsed
NONFINITE_REASONS = ("nonfinite_loss", "nonfinite_grad_norm")


@dataclass
class Run:
    """Everything one training run holds on to."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    pair: ModelPair
    scorer: torch.nn.Module  # StudentScorer: wrapped by accelerate (DDP), or the FSDP2 root (training.parallel=fsdp2)
    optimizer: torch.optim.Optimizer
    sampler: PromptSampler
    val: list[dict]
    tracker: Tracker
    grader: Grader  # the evaluation grader (math-verify + normalisation, time-bounded)
    engine: RolloutEngine  # samples rollouts: HF generate on the student, or a colocated vLLM engine
    teacher: object  # scores rollouts: the in-process model, a vLLM engine or a server (poweropd.teachers)
    skipped_prompts: int = 0  # training prompts left out for being longer than training.max_prompt_tokens

    @property
    def student(self):
        return self.accelerator.unwrap_model(self.scorer).lm

    @property
    def sharded(self) -> bool:
        return self.cfg.training.parallel == "fsdp2"

    @property
    def state(self):
        """What a checkpoint holds of this run besides the trainer state (poweropd.checkpoint)."""
        generation = export_generation_config(self)
        if self.sharded:
            return ShardedState(self.accelerator, self.scorer, self.optimizer, generation)
        return AccelerateState(self.accelerator, self.scorer, generation)

    def weights_finite(self) -> bool:
        """Whether the student's weights are finite (on every process, when sharded)."""
        if self.sharded:
            from poweropd.sharding import all_finite

            return all_finite(self.student)
        return weights_finite(self.student)


# ----------------------------------------------------------------------------------------
# The update


def opd_step(run: Run, rows: list[dict]) -> tuple[dict, dict]:
    """One on-policy update on this process's share `rows` of the prompt batch.
    Returns (step metrics, per-token tensors for position statistics)."""
    clock = StepClock(run.accelerator.device)
    # 1. Sample rollouts from the current student.
    rollouts = sample_rollouts(run, rows, training_sampling(run.cfg.training))
    run.engine.sleep()  # a vLLM engine frees its GPU memory for the update (CUDA, vllm.sleep)
    clock.lap("generate")
    correct_B = grade_rollouts(run, rows, rollouts) if run.cfg.reward.task_weight else None
    metrics, tokens = opd_update(run, rollouts, clock, correct_B)
    if correct_B is not None:
        correct = gather_tokens(run.accelerator, correct_B.float().to(run.accelerator.device))
        metrics["task/accuracy"] = correct.mean().item()
    # 6. The next rollouts must come from the updated student: copy it into the engine.
    if run.engine.name != "hf":
        metrics["engine/sync_s"] = sync_engine(run)
    return metrics, tokens


def export_generation_config(run: Run):
    """The generation_config.json a saved student carries: the pair's stop tokens (both
    <|im_end|> and <|endoftext|> for the Qwen3 pairs: the tokenizer's eos alone would let a
    Base student run past its answer), its pad token, and the run's validation sampling (the
    paper's evaluation settings), so that `student/` generates like the run in plain
    transformers, vLLM or lm-eval."""
    from transformers import GenerationConfig

    tc, pair = run.cfg.training, run.pair
    sampling = {"do_sample": False} if tc.val_temperature == 0 else {
        "do_sample": True, "temperature": tc.val_temperature, "top_p": tc.val_top_p, "top_k": tc.val_top_k
    }  # fmt: skip
    return GenerationConfig(eos_token_id=list(pair.stop_ids), pad_token_id=pair.pad_id, **sampling)


def sync_engine(run: Run) -> float:
    """Copy the student's weights into the rollout engine. A sharded student's are gathered on
    every process one tensor at a time as the engine loads them (each process's engine holds
    a full copy; the trainer never holds the whole gathered student)."""
    if not run.sharded:
        return run.engine.sync(run.student)
    from poweropd.models import DTYPES
    from poweropd.sharding import full_tensors

    dtype = DTYPES.get(getattr(run.engine, "dtype", ""), None)  # gathered in the engine's own dtype
    return run.engine.sync(run.student, full_tensors(run.student, dtype))


def opd_update(
    run: Run, rollouts: Rollouts, clock: StepClock | None = None, task_correct_B: torch.Tensor | None = None
) -> tuple[dict, dict]:
    """Steps 2-5 of the update on rollouts the student just sampled (`task_correct_B`: the
    grader's verdict on each rollout, needed when reward.task_weight > 0)."""
    cfg, acc = run.cfg, run.accelerator
    tc, rc = cfg.training, cfg.reward
    objective = get_objective(rc.name)
    clock = clock or StepClock(acc.device)
    mask_BT = rollouts.loss_mask_BT(rc.stop_token)
    if int(acc.reduce(mask_BT.sum(), "sum").item()) == 0:  # e.g. every rollout is a bare stop token
        return _empty_update(run, rollouts, clock), {}
    micro = micro_batches(rollouts.input_ids_BS.shape[0], tc.micro_batch_size)

    # 2. The teacher scores the very same token ids (no grad), giving what the objective needs:
    # in this process, in a vLLM engine or on a server (poweropd.teachers).
    teacher = run.teacher.score(
        objective.teacher, [_model_inputs(rollouts, mask_BT, rows) for rows in micro], tc.logprob_chunk_size, rc.k
    )
    teacher_s = clock.lap("teacher")
    n_scored = int(mask_BT.sum())
    # A non-finite teacher value (a bf16 teacher giving a sampled token probability 0, a NaN
    # activation) says nothing about the student: those tokens leave this update (N included).
    mask_BT, teacher, n_bad_teacher = drop_nonfinite_teacher_tokens(mask_BT, micro, teacher)
    n_global = int(acc.reduce(mask_BT.sum(), "sum").item())
    if n_global == 0:  # every valid token had a non-finite teacher value
        return _empty_update(run, rollouts, clock, {"nonfinite/teacher_tokens": n_bad_teacher}), {}
    weights_BT = loss_weights(acc, mask_BT, rc.loss_agg)
    task_B = None
    if rc.task_weight and task_correct_B is not None:
        task_B = task_advantage(task_correct_B.to(acc.device), tc.rollouts_per_prompt)
    # z-score needs the whole batch's moments before the first backward; with several
    # micro-batches that takes one extra no-grad student pass.
    moments = None
    if rc.normalize == "zscore" and len(micro) > 1:
        moments = zscore_moments_prepass(run, objective, rollouts, mask_BT, micro, teacher)

    # 3. The objective's loss of each micro-batch (student log-probs, rewards, loss; see
    # poweropd.objectives), one backward each; gradients sync on the last.
    outs, positions = [], []
    for i, rows in enumerate(micro):
        m_BT = mask_BT[rows]
        batch = MicroBatch(
            inputs=_model_inputs(rollouts, mask_BT, rows),
            teacher=teacher[i],
            weights_N=weights_BT[rows][m_BT],
            rc=rc,
            chunk=tc.logprob_chunk_size,
            teacher_head_VD=run.teacher.head_VD,
            moments=moments,
            task_N=None if task_B is None else task_B[rows][:, None].expand_as(m_BT)[m_BT],
            reduce=lambda t: acc.reduce(t, "sum"),
        )
        sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(run.scorer)
        with sync:
            with acc.autocast():
                out = objective.micro_loss(run.scorer, batch)
            acc.backward(out.loss)
        outs.append(out)
        positions.append(torch.nonzero(m_BT)[:, 1])
    run.teacher.release()  # a sharded teacher's gathered lm-head is no longer needed
    clock.lap("student")

    # 4. Clip (logging the norm before clipping) and step, unless something is non-finite: a
    # non-finite student log-prob comes from the student's own forward, and its backward has
    # already carried it into the gradients, so the whole update is dropped, never stepped.
    if run.sharded:  # torch's clip on the sharded gradients: the norm of the whole model
        from poweropd.sharding import clip_grad_norm

        grad_norm = clip_grad_norm(run.scorer.parameters(), tc.max_grad_norm)
    else:
        grad_norm = acc.clip_grad_norm_(run.scorer.parameters(), tc.max_grad_norm)
    loss_total = acc.reduce(sum(out.loss.detach() for out in outs), "sum") / acc.num_processes
    skip_reason = None
    if not torch.isfinite(loss_total):
        skip_reason = "nonfinite_loss"
    elif not torch.isfinite(torch.as_tensor(grad_norm)):
        skip_reason = "nonfinite_grad_norm"
    if skip_reason is None:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")

    # 5. Statistics, from tensors already in hand (no extra model pass); non-finite values are
    # counted, not averaged.
    flat = token_tensors(outs, positions)
    gathered = {k: gather_tokens(acc, v) for k, v in flat.items()}
    n_bad_student = int((~torch.isfinite(gathered["lS"])).sum().item())
    gathered = finite_tokens(gathered)
    metrics = {
        "loss": loss_total.item(),
        "grad_norm": float(grad_norm),
        "n_tokens": n_global,
        **rollout_metrics(acc, rollouts),
        **summarize("log_ratio", gathered["log_ratio"]),
    }
    if n_bad_teacher or n_bad_student:
        metrics["nonfinite/teacher_tokens"] = n_bad_teacher
        metrics["nonfinite/student_tokens"] = n_bad_student
    if skip_reason is not None:
        metrics.update(skipped=1, skip_reason=skip_reason)
    for key in ("reward", "kl"):
        if key in gathered:
            metrics.update(summarize(key, gathered[key]))
    metrics.update(diagnostics(gathered))
    if rollouts.engine_logprobs_BT is not None:
        metrics.update(engine_logprob_gap(acc, rollouts.engine_logprobs_BT[mask_BT], flat["lS"]))
    metrics.update(clock.metrics())
    metrics["tokens_per_s"] = metrics["n_generated"] / max(metrics["step_time"], 1e-9)
    metrics.update(run.teacher.metrics())
    metrics["teacher/tokens_per_s"] = n_scored / max(teacher_s, 1e-9)  # this process's loss tokens
    return metrics, gathered


ACTIVE_REWARD = 0.01  # |reward| above which a token counts as still pushing the student (the authors' threshold)


def diagnostics(tokens: dict) -> dict:
    """The two per-step readings the authors' trainer logs beside the reward statistics: the
    student's mean policy entropy over the rollout tokens (from the loss pass's own lm-head
    chunks) and the share of tokens whose |reward| exceeds ACTIVE_REWARD (sampled-token
    objectives). The authors use 0.01 for the probability-difference rewards and 0.1 for
    the log-ratio family; one threshold here, so read the share across reward scales (a
    z-scored reward is almost never within 0.01 of 0) as a property of each scale."""
    out = {}
    if "entropy" in tokens and tokens["entropy"].numel():
        out["entropy/mean"] = tokens["entropy"].double().mean().item()
    if "reward" in tokens and tokens["reward"].numel():
        out[f"reward/frac_above_{ACTIVE_REWARD:g}"] = (tokens["reward"].abs() > ACTIVE_REWARD).double().mean().item()
    return out


def token_tensors(outs: list[MicroLoss], positions: list[torch.Tensor]) -> dict:
    """The update's per-token tensors (this process's N valid tokens, micro-batches in order)."""
    flat = {
        "lT": torch.cat([o.lT_N for o in outs]),
        "lS": torch.cat([o.lS_N.detach() for o in outs]),
        "pos": torch.cat(positions),
    }
    for key, attr in (("reward", "reward_N"), ("kl", "kl_N"), ("entropy", "entropy_N")):
        if getattr(outs[0], attr) is not None:
            flat[key] = torch.cat([getattr(o, attr) for o in outs])
    flat["log_ratio"] = flat["lT"] - flat["lS"]
    return flat


def grade_rollouts(run: Run, rows: list[dict], rollouts: Rollouts) -> torch.Tensor:
    """The grader's verdict (1 correct, 0 not) on each rollout of `rows` (repeated in order)."""
    repeats = rollouts.input_ids_BS.shape[0] // max(len(rows), 1)
    texts = run.pair.tokenizer.batch_decode(rollouts.completion_ids_BT, skip_special_tokens=True)
    items = [(text, rows[i // repeats]["answer"], rows[i // repeats]) for i, text in enumerate(texts)]
    return torch.tensor([float(g.correct) for g in run.grader.grade_many(items)])


def engine_logprob_gap(acc: Accelerator, engine_N: torch.Tensor, trainer_N: torch.Tensor) -> dict:
    """|engine log-prob - trainer log-prob| of the sampled tokens (training-inference mismatch)."""
    gap = gather_tokens(acc, (engine_N.to(trainer_N.device, trainer_N.dtype) - trainer_N).abs())
    gap = gap[torch.isfinite(gap)]
    if not gap.numel():
        return {}
    return {"engine/logprob_gap_mean": gap.mean().item(), "engine/logprob_gap_max": gap.max().item()}


def _empty_update(run: Run, rollouts: Rollouts, clock: StepClock, extra: dict | None = None) -> dict:
    """Metrics of an update with no valid token to learn from: nothing is stepped."""
    run.optimizer.zero_grad(set_to_none=True)
    metrics = {"skipped": 1, "skip_reason": "empty", "n_tokens": 0, **(extra or {})}
    return {**metrics, **rollout_metrics(run.accelerator, rollouts), **clock.metrics()}


def drop_nonfinite_teacher_tokens(mask_BT, micro, teacher: list[TeacherOut]):
    """Take tokens whose teacher values (log-prob, or for the vocabulary objectives the hidden
    state) are not finite out of the loss mask and out of the teacher outputs. Returns
    (mask_BT, teacher, tokens dropped on this process)."""
    mask_BT = mask_BT.clone()
    kept, dropped = [], 0
    for rows, out in zip(micro, teacher):
        ok_N = out.finite_N()
        if bool(ok_N.all()):
            kept.append(out)
            continue
        dropped += int((~ok_N).sum())
        sub_BT = mask_BT[rows]  # a view: the row-major order of its True entries is the order of N
        sub_BT[sub_BT.clone()] = ok_N
        kept.append(out.keep(ok_N))
    return mask_BT, kept, dropped


def finite_tokens(tokens: dict) -> dict:
    """The per-token tensors restricted to tokens whose values are all finite."""
    ok = torch.ones_like(tokens["lS"], dtype=torch.bool)
    for key in ("lT", "lS", "reward", "kl", "log_ratio", "entropy"):
        if key in tokens:
            ok &= torch.isfinite(tokens[key])
    if bool(ok.all()):
        return tokens
    return {k: v[ok] for k, v in tokens.items()}


@torch.no_grad()
def zscore_moments_prepass(run: Run, objective: Objective, rollouts: Rollouts, mask_BT, micro, teacher) -> torch.Tensor:
    """[count, sum, sum of squares] of the raw rewards of the whole batch (all processes)."""
    scorer = run.accelerator.unwrap_model(run.scorer)
    total = torch.zeros(3, dtype=torch.float64, device=run.accelerator.device)
    for rows, out in zip(micro, teacher):
        with run.accelerator.autocast():
            lS_N = scorer(*_model_inputs(rollouts, mask_BT, rows))
        r_N = objective.raw_reward(run.cfg.reward, out.lT_N, lS_N)
        total += masked_moments(r_N, torch.ones_like(r_N))
    return run.accelerator.reduce(total, "sum")


def loss_weights(acc: Accelerator, mask_BT: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-token weights w so that loss = -sum_t w_t r_t lS_t.

    token_mean: w = 1/N with N the valid tokens of the whole batch (all processes);
    seq_mean:   w = 1/(B' n_b), the mean over the B' non-empty rollouts of per-rollout means.
    Multiplied by the number of processes, because DDP averages gradients over them.
    """
    mask = mask_BT.float()
    if loss_agg == "token_mean":
        denom = acc.reduce(mask.sum(), "sum")
        return mask / denom * acc.num_processes
    per_seq_B = mask.sum(-1)
    n_seqs = acc.reduce((per_seq_B > 0).float().sum(), "sum")
    return mask / per_seq_B.clamp(min=1)[:, None] / n_seqs * acc.num_processes


def micro_batches(n: int, size: int) -> list[slice]:
    size = size or n
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _model_inputs(rollouts: Rollouts, mask_BT, rows: slice):
    return rollouts.input_ids_BS[rows], rollouts.attention_mask_BS[rows], rollouts.prompt_len, mask_BT[rows]


# ----------------------------------------------------------------------------------------
# Rollouts, validation and the pre-training reward dump


def training_sampling(tc) -> SamplingParams:
    return SamplingParams(tc.max_new_tokens, tc.temperature, tc.top_p, tc.top_k)


def validation_sampling(tc) -> SamplingParams:
    return SamplingParams(
        tc.val_max_new_tokens,
        max(tc.val_temperature, 1e-6),
        tc.val_top_p,
        tc.val_top_k,
        greedy=tc.val_temperature == 0,
    )


def sample_rollouts(run: Run, rows: list[dict], params: SamplingParams, repeats: int | None = None) -> Rollouts:
    cfg = run.cfg
    repeats = cfg.training.rollouts_per_prompt if repeats is None else repeats
    mp = cfg.model_pair
    prompts = chat_prompts(run.pair.tokenizer, [r["problem"] for r in rows], mp.instruction, mp.enable_thinking)
    prompts = [p for p in prompts for _ in range(repeats)]
    return run.engine.generate(prompts, params)


def build_engine(cfg: Config, pair: ModelPair, acc: Accelerator, sharded_root=None) -> RolloutEngine:
    """The rollout engine of a run. HF generates in the run's precision (autocast), on the
    gathered student when it is sharded (`sharded_root`, the FSDP2 root); vLLM is built from
    the student's checkpoint and synced with the live student before each use."""
    tc = cfg.training
    context = acc.autocast
    if sharded_root is not None:
        from poweropd.sharding import gathered_for_generation

        def context():
            stack = contextlib.ExitStack()
            stack.enter_context(gathered_for_generation(sharded_root))
            stack.enter_context(acc.autocast())
            return stack

    precision = _mixed_precision(tc.mixed_precision)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision) or str(pair.student.dtype).removeprefix("torch.")
    return make_engine(
        tc.rollout_engine,
        stop_ids=pair.stop_ids,
        pad_id=pair.pad_id,
        model=pair.student if tc.rollout_engine == "hf" else None,  # vLLM is synced with it at the start
        model_path=pair.student_path,
        batch_size=tc.gen_batch_size,
        autocast=context,
        dtype=dtype,
        seed=cfg.seed + acc.process_index,
        trust_remote_code=cfg.model_pair.trust_remote_code,
        vllm=tc.vllm,
        launched=acc.num_processes > 1,
    )


def check_engine(cfg: Config) -> None:
    """Refuse an unusable engine setting in one line, before any weights load."""
    if cfg.training.rollout_engine != "vllm":
        return
    from poweropd.vllm_engine import check_engine_model

    mp = cfg.model_pair
    if mp.kind == "toy":
        spec = mp.toy.student
        model_config = type("ToyConfig", (), {})()
        model_config.hidden_size, model_config.num_attention_heads = spec.hidden, spec.heads
        model_config.head_dim = spec.head_dim or spec.hidden // spec.heads
    else:
        from transformers import AutoConfig

        kwargs = {"revision": mp.revision, "trust_remote_code": mp.trust_remote_code}
        model_config = AutoConfig.from_pretrained(mp.student, **kwargs)
    check_engine_model(model_config, "cuda" if torch.cuda.is_available() else "cpu", "training.rollout_engine")


def rollout_metrics(acc: Accelerator, rollouts: Rollouts) -> dict:
    lengths = gather_tokens(acc, rollouts.lengths_B.float())
    stopped = gather_tokens(acc, rollouts.stopped_B.float())
    return {
        "response_length": lengths.mean().item(),
        "truncation_rate": 1.0 - stopped.mean().item(),
        "n_generated": int(lengths.sum().item()),
    }


@torch.no_grad()
def validate(run: Run, step: int) -> dict:
    """Accuracy of one sample per held-out problem; sampling uses its own RNG stream so
    that validating more or less often never changes the training trajectory."""
    acc = run.accelerator
    rows = run.val[acc.process_index :: acc.num_processes]
    if not rows:
        return {}
    tok = run.pair.tokenizer
    with _private_rng(acc, run.cfg.seed * 7919 + step):
        rollouts = sample_rollouts(run, rows, validation_sampling(run.cfg.training), repeats=1)
    texts = tok.batch_decode(rollouts.completion_ids_BT, skip_special_tokens=True)
    grades = run.grader.grade_many([(t, r["answer"], r) for t, r in zip(texts, rows)])
    correct = gather_tokens(acc, torch.tensor([float(g.correct) for g in grades], device=acc.device))
    out = {
        "val/accuracy": correct.mean().item(),
        **{f"val/{k}": v for k, v in rollout_metrics(acc, rollouts).items() if k != "n_generated"},
    }
    run.tracker.log_samples(
        step,
        [
            {"id": r["id"], "response": t, "answer": r["answer"], "extracted": g.extracted, "correct": g.correct}
            for r, t, g in list(zip(rows, texts, grades))[:4]
        ],
    )
    return out


@torch.no_grad()
def reward_dump(run: Run) -> dict:
    """Every token-level reward of rollouts on M held-out prompts, before any update
    (the paper's Figure 2a data). Runs on the main process only (on every process when the
    models are sharded, since their forwards are collectives; the main one writes)."""
    acc, tc, rc = run.accelerator, run.cfg.training, run.cfg.reward
    if not acc.is_main_process and not run.sharded:
        return {}
    rows = val_rows(tc.val_data, tc.reward_dump_prompts, tc.data_dir)
    rows = rows or run.sampler.rows[: tc.reward_dump_prompts]
    with _private_rng(acc, run.cfg.seed * 104729 + 1):
        rollouts = sample_rollouts(run, rows, training_sampling(tc), repeats=1)
    mask_BT = rollouts.loss_mask_BT(rc.stop_token)
    scorer, lT, lS = acc.unwrap_model(run.scorer), [], []
    for rows_ in micro_batches(len(rows), tc.micro_batch_size):  # as many rows per pass as training uses
        inputs = _model_inputs(rollouts, mask_BT, rows_)
        lT.append(run.teacher.score("logprobs", [inputs], tc.logprob_chunk_size)[0].lT_N)
        with acc.autocast():
            lS.append(scorer(*inputs).float())
    lT_N, lS_N = torch.cat(lT).float(), torch.cat(lS)
    run.teacher.metrics()  # the dump's scoring is not an update's
    if not acc.is_main_process:
        return {}
    where = torch.nonzero(mask_BT)
    arrays = {
        "rollout": where[:, 0],
        "position": where[:, 1],
        "token_id": rollouts.completion_ids_BT[mask_BT],
        "teacher_logprob": lT_N,
        "student_logprob": lS_N,
        "log_ratio": lT_N - lS_N,
    }
    objective = get_objective(rc.name)
    if objective.reward is not None:  # per-token rewards (reward-to-go and task reward not applied)
        ones = torch.ones_like(lT_N)
        r_N = objective.reward(lT_N, lS_N, ones, rc)
        arrays["reward"] = zscore(r_N, ones, masked_moments(r_N, ones)) if rc.normalize == "zscore" else r_N
    np.savez_compressed(run.run_dir / REWARD_DUMP, **{k: v.cpu().numpy() for k, v in arrays.items()})
    texts = run.pair.tokenizer.batch_decode(rollouts.completion_ids_BT, skip_special_tokens=True)
    with (run.run_dir / REWARD_DUMP_ROLLOUTS).open("w", encoding="utf-8") as handle:
        for i, (row, text) in enumerate(zip(rows, texts)):
            record = {
                "rollout": i,
                "id": row["id"],
                "response": text,
                "length": int(rollouts.lengths_B[i]),
                "stopped": bool(rollouts.stopped_B[i]),
            }
            handle.write(json.dumps(record) + "\n")
    out = {"dump/n_tokens": int(mask_BT.sum()), "dump/prompts": len(rows)}
    out.update({f"dump/{k}": v for k, v in summarize("log_ratio", arrays["log_ratio"]).items()})
    if "reward" in arrays:
        out.update({f"dump/{k}": v for k, v in summarize("reward", arrays["reward"]).items()})
    return out


@contextlib.contextmanager
def _private_rng(acc: Accelerator, seed: int):
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + acc.process_index)
        yield


# ----------------------------------------------------------------------------------------
# The run


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def lr_at(tc, step: int) -> float:
    """Learning rate of update `step` (1-based): linear warmup, then constant or cosine."""
    if tc.warmup_steps and step <= tc.warmup_steps:
        return tc.lr * step / tc.warmup_steps
    if tc.lr_schedule == "cosine":
        progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
        return tc.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return tc.lr


def train(cfg: Config, run_dir: Path) -> dict:
    """Run (or resume) one OPD training run in `run_dir`; returns the summary."""
    wall_start = time.time()
    if cfg.training.cpu_threads:
        torch.set_num_threads(cfg.training.cpu_threads)
    join_job_tasks()
    acc = make_accelerator(cfg)
    run_dir = shared_run_dir(acc, run_dir)
    lock, refused = RunLock(run_dir), ""
    if acc.is_main_process:  # one process per run directory, for the whole run
        try:
            lock.acquire()
        except ConfigError as exc:
            restore_first_launch(run_dir)  # this refused launch's Hydra rewrote .hydra/ of the running one
            refused = str(exc)
    if acc.num_processes > 1:  # every process learns the main one's answer
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused:
        raise ConfigError(refused)
    try:
        return _train(cfg, run_dir, acc, wall_start)
    finally:
        lock.release()


def _train(cfg: Config, run_dir: Path, acc: Accelerator, wall_start: float) -> dict:
    ended = (run_dir / SUMMARY).exists()
    acc.wait_for_everyone()  # every process has looked before the main one moves the summary
    if ended:
        previous = read_json_object(
            run_dir / SUMMARY, "delete it to resume the run from its last checkpoint (the metrics are kept)"
        )
        if previous.get("status") == "finished" or latest_checkpoint(run_dir) is None:
            # Only the same experiment is "already done": a sweep whose job numbers moved (a
            # grid edited between launches) must not take another config's run for its own.
            check_resume_config(cfg, run_dir, acc.is_main_process)
            if acc.is_main_process:
                restore_first_launch(run_dir)  # Hydra rewrote .hydra/ for this launch: undo it
            log.info("%s already holds an ended run (summary.json); nothing to do", run_dir)
            return previous
    # From the moment a run's config is recorded, a different one is refused (before any
    # model is loaded, and before anything of the old run is moved away).
    check_resume_config(cfg, run_dir, acc.is_main_process)
    if ended:
        # A run that stopped early (non-finite updates, collapse) resumes from its last good
        # checkpoint; its old summary is kept beside the new one.
        if acc.is_main_process:
            (run_dir / SUMMARY).rename(run_dir / f"summary.{previous.get('status')}.step{previous.get('steps')}.json")
        acc.wait_for_everyone()
    check_engine(cfg)
    run = setup_run(cfg, run_dir, acc)
    try:
        return _loop(run, wall_start)
    except BaseException:
        run.tracker.close()
        raise
    finally:
        run.grader.close()
        run.engine.close()
        run.teacher.close()


def join_job_tasks() -> None:
    """A submitit job with several tasks, started without torchrun
    (hydra/launcher=slurm_multinode: tasks_per_node processes on each of `nodes` nodes): each
    task is one trainer process. It gets the torch.distributed variables torchrun would have
    set (rank, world size, local rank, the first node as master) from the job's environment
    (submitit's TorchDistributedEnvironment); under torchrun or accelerate nothing changes."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        tasks = JobEnvironment().num_tasks
    except (ImportError, RuntimeError):  # not inside a job
        return
    if tasks > 1:
        # accelerate picks the GPU; variables already set (a MASTER_ADDR of the shell) yield to the job's
        found = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        log.info("job task %d of %d (master %s:%d)", found.rank, found.world_size, found.master_addr, found.master_port)


# What `accelerate launch` sets for a sharded run (--use_fsdp / --use_deepspeed, or a config file).
SHARDING_REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def refuse_ignored_sharding() -> None:
    """accelerate runs FSDP and DeepSpeed only on GPUs. On a CPU (Accelerator(cpu=True)) an
    FSDP request silently becomes plain data parallel (and DeepSpeed fails deep inside), so a
    run would report DDP numbers under an FSDP name: refused in one line instead."""
    if torch.cuda.is_available():
        return
    for variable, name in SHARDING_REQUESTS.items():
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"{variable} is set (accelerate launch with {name}), but accelerate shards only on GPUs: on this CPU "
                f"the run would silently be plain data parallel; launch without {name} (torchrun or accelerate "
                "launch --multi_cpu give data parallel)"
            )


def make_accelerator(cfg: Config) -> Accelerator:
    tc = cfg.training
    refuse_ignored_sharding()
    # Under FSDP2 the precision is FSDP's MixedPrecisionPolicy (poweropd.sharding), not autocast.
    precision = "no" if tc.parallel == "fsdp2" else _mixed_precision(tc.mixed_precision)
    if tc.parallel == "fsdp2" and tc.fsdp.cpu_offload and torch.cuda.is_available() and "WORLD_SIZE" in os.environ:
        # Offloaded shards and gradients are CPU tensors: clipping reduces them, which NCCL cannot.
        import torch.distributed as dist

        if not dist.is_initialized():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("cuda:nccl,cpu:gloo")
    acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    if tc.parallel == "fsdp2":
        ensure_process_group(acc)
    per_process = tc.batch_size // acc.num_processes
    if tc.batch_size % acc.num_processes or per_process % tc.rollouts_per_prompt:
        raise ConfigError(
            f"training.batch_size={tc.batch_size} must split evenly over {acc.num_processes} process(es) "
            f"into whole prompts of training.rollouts_per_prompt={tc.rollouts_per_prompt} rollouts"
        )
    if cfg.model_pair.teacher_backend == "vllm" and acc.num_processes > 1:
        raise ConfigError(
            f"model_pair.teacher_backend=vllm builds one teacher engine inside one trainer process, not in each of "
            f"{acc.num_processes}; serve the teacher once for all of them (python -m poweropd.serve teacher, then "
            "model_pair.teacher_backend=server) or keep it in the trainer (hf; training.parallel=fsdp2 shards it)"
        )
    if tc.rollout_engine == "vllm" and acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"training.rollout_engine=vllm syncs full weights from each process, which {acc.distributed_type.name} "
            "shards; use DDP (accelerate launch --multi_gpu) or training.rollout_engine=hf"
        )
    return acc


def ensure_process_group(acc: Accelerator) -> None:
    """FSDP2 shards over a process group; a plain one-process `python run.py` has none, so
    it gets a one-member group (FSDP2 at one process: the same code path, nothing sharded)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if acc.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shared_run_dir(acc: Accelerator, run_dir: Path) -> Path:
    """Under `accelerate launch` every process composed its own Hydra run directory (their
    timestamps can differ by a second); all of them use the main process's one."""
    if acc.num_processes == 1:
        return run_dir
    from accelerate.utils import broadcast_object_list

    chosen = Path(broadcast_object_list([str(run_dir)])[0])
    if chosen != run_dir and run_dir.is_dir():
        leftovers = {p.name for p in run_dir.iterdir()}
        if leftovers <= HYDRA_OWN:  # only what Hydra itself wrote there
            shutil.rmtree(run_dir, ignore_errors=True)
    return chosen


def setup_run(cfg: Config, run_dir: Path, acc: Accelerator | None = None) -> Run:
    """Data, model pair, optimizer and run-directory writers."""
    tc = cfg.training
    acc = acc or make_accelerator(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    rows = train_rows(tc.train_data, tc.data_dir)
    val = val_rows(tc.val_data, tc.val_size, tc.data_dir)
    if 0 < len(val) < acc.num_processes:  # a process without a problem would miss the others' collectives
        raise ConfigError(
            f"{len(val)} validation problem(s) for {acc.num_processes} processes: every process validates its "
            "share; raise training.val_size or set training.val_data=none"
        )
    remote = []  # a vllm / server teacher, opened (and checked) before any weights load

    def open_remote(tokenizer, teacher_path, student_path):
        remote.append(open_teacher(cfg, tokenizer, teacher_path, student_path, cfg.seed + acc.process_index))

    hook = open_remote if cfg.model_pair.teacher_backend != "hf" else None
    sharded = tc.parallel == "fsdp2"
    with acc.main_process_first():  # the main process builds the toy pair if needed; the others wait
        elsewhere = _weights_elsewhere(cfg, acc)
        pair = load_pair(cfg.model_pair, acc.device, before_weights=hook, place=not sharded, without_weights=elsewhere)
    if remote:
        teacher = remote[0]
    elif sharded and tc.fsdp.shard_teacher:
        from poweropd.sharding import shard_teacher

        teacher = HFTeacher(pair.teacher, root=shard_teacher(pair.teacher, acc.device))
    else:
        if sharded:  # a full teacher copy per process
            pair.teacher.to(acc.device)
        teacher = HFTeacher(pair.teacher)
    if teacher.name == "server":  # the run's record names what was served, and where
        pair.teacher_path = f"{teacher.client.model} at {teacher.client.url}"
    rows, too_long = bound_prompts(rows, pair.tokenizer, tc.max_prompt_tokens)
    if too_long:
        log.warning(
            "skipped %d training prompt(s) longer than training.max_prompt_tokens=%d (ids %s%s)",
            len(too_long),
            tc.max_prompt_tokens,
            ", ".join(map(str, too_long[:3])),
            ", ..." if len(too_long) > 3 else "",
        )
    pair.student.train()  # from_pretrained returns eval mode; train mode turns on checkpointing (dropout is 0)
    if tc.gradient_checkpointing:
        pair.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scorer = StudentScorer(pair.student, tc.logprob_chunk_size)
    if sharded:  # torch's FSDP2, before the optimizer sees the (now sharded) parameters
        from poweropd.sharding import shard_student

        shard_student(scorer, acc.device, _mixed_precision(tc.mixed_precision), tc.fsdp.cpu_offload)
    optimizer = torch.optim.AdamW(
        scorer.parameters(), lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay
    )
    if not sharded:
        scorer, optimizer = acc.prepare(scorer, optimizer)
    # Seed last: building the toy pair (first use only) draws random numbers of its own,
    # and a run must not depend on whether the pair was already cached.
    set_seed(cfg.seed + acc.process_index)
    engine = build_engine(cfg, pair, acc, scorer if sharded else None)
    tracker = Tracker(run_dir, cfg.logger, asdict(cfg), enabled=acc.is_main_process)
    sampler = PromptSampler(rows, cfg.seed)
    return Run(
        cfg, run_dir, acc, pair, scorer, optimizer, sampler, val, tracker, Grader(), engine, teacher, len(too_long)
    )


def _weights_elsewhere(cfg: Config, acc: Accelerator) -> frozenset[str]:
    """The models this process builds without reading their weights: under FSDP2 with several
    processes, only the main process reads the student (and a sharded teacher); the others
    receive their shards from it (poweropd.sharding)."""
    tc = cfg.training
    if tc.parallel != "fsdp2" or acc.num_processes == 1 or acc.is_main_process:
        return frozenset()
    return frozenset({"student", "teacher"} if tc.fsdp.shard_teacher else {"student"})


def _loop(run: Run, wall_start: float) -> dict:
    cfg, acc, tracker = run.cfg, run.accelerator, run.tracker
    tc = cfg.training
    start_step, resumed_from, discarded = 0, None, []
    resumed = resume_from_newest(run.run_dir, acc, run.state, tc.allow_inexact_resume)
    if resumed is not None:
        checkpoint, state = resumed
        start_step = resumed_from = int(state["step"])
        run.sampler.load_state_dict(state["sampler"])
        discarded = tracker.rewind(start_step)
        log.info("resumed from %s (step %d of %d)", checkpoint, start_step, tc.steps)
    if run.engine.name != "hf":  # the engine starts from the checkpoint the student was loaded from
        seconds, executor = sync_engine(run), getattr(run.engine, "executor", "")
        log.info("%s engine (%s executor) synced with the student in %.2f s", run.engine.name, executor, seconds)
    if resumed is None:
        tracker.start_fresh()
        if acc.is_main_process:
            record_run_config(run)
        initial = reward_dump(run) if tc.reward_dump_prompts else {}
        if run.val:
            initial.update(validate(run, 0))
        tracker.log(0, initial)

    global_prompts = tc.batch_size // tc.rollouts_per_prompt
    share = global_prompts // acc.num_processes
    empty_streak, nonfinite_streak, status, step = 0, 0, "finished", start_step
    bar = tqdm(
        total=tc.steps,
        initial=start_step,
        desc=f"OPD {cfg.reward.label}",
        unit="step",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    )
    with GracefulStop() as stop:
        for step in range(start_step + 1, tc.steps + 1):
            lr = lr_at(tc, step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            before = StepStart(run) if run.teacher.name != "hf" else None
            batch = run.sampler.next_batch(global_prompts)
            rows = batch[acc.process_index * share : (acc.process_index + 1) * share]
            try:
                metrics, tokens = opd_step(run, rows)
            except TeacherFailure:  # scored before any weight moved: the last update is intact
                bar.close()
                before.checkpoint(step - 1)
                tracker.close()
                raise
            metrics["lr"] = lr
            if run.val and ((tc.val_every and step % tc.val_every == 0) or step == tc.steps):
                metrics.update(validate(run, step))
            tracker.log(step, metrics)
            if tokens and tokens["pos"].numel() and tc.position_stats_every and step % tc.position_stats_every == 0:
                tracker.log_positions(step, position_stats(tokens))
            reason = metrics.get("skip_reason")
            empty_streak = empty_streak + 1 if reason == "empty" else 0
            nonfinite_streak = nonfinite_streak + 1 if reason in NONFINITE_REASONS else 0
            bar.update()
            bar.set_postfix(_postfix(metrics), refresh=False)
            if empty_streak >= MAX_EMPTY_BATCHES:
                status = "collapsed"
                log.warning(
                    "%d batches in a row had no valid completion token; stopping at step %d", empty_streak, step
                )
                break
            if nonfinite_streak >= tc.max_skipped_updates:
                status = "nonfinite"
                break
            stopping = stop.requested(acc) and step < tc.steps
            if (tc.save_every and step % tc.save_every == 0 and step < tc.steps) or stopping:
                if not run.weights_finite():  # never checkpoint them (the skip guard should make this unreachable)
                    status = "nonfinite"
                    log.error("the student's weights are not finite at step %d; not checkpointing them", step)
                    break
                checkpoint_run(run, step)
            if stopping:  # preempted: the update in flight finished and is checkpointed; hand over
                bar.close()
                log.warning(
                    "stopped by %s after step %d of %d: checkpoint step_%06d written; the same command resumes",
                    stop.name,
                    step,
                    tc.steps,
                    step,
                )
                tracker.close()
                stop.hand_over()
    bar.close()

    acc.wait_for_everyone()
    finite = run.weights_finite()
    if finite:
        run.state.save_student(run.run_dir / FINAL_MODEL)
        if acc.is_main_process:
            run.pair.tokenizer.save_pretrained(run.run_dir / FINAL_MODEL)
    summary = build_summary(run, status, step, resumed_from, wall_start)
    summary["final_student_saved"] = finite
    summary["discarded_metrics_lines"] = discarded
    if summary["missing_metrics_steps"]:
        log.warning(
            "metrics.jsonl has no line for %d step(s) (%s...): lost before the checkpoint the run resumed from",
            len(summary["missing_metrics_steps"]),
            ", ".join(map(str, summary["missing_metrics_steps"][:5])),
        )
    tracker.finish(summary)
    if status == "nonfinite":
        log.error(
            "stopped at step %d: %d updates in a row had a non-finite loss or gradient and were skipped (weights "
            "untouched%s); see skip_reason in metrics.jsonl, resume with the same command",
            step,
            nonfinite_streak,
            ", final student saved" if finite else "",
        )
    return summary


def checkpoint_run(run: Run, step: int) -> None:
    """Checkpoint the run after update `step`: the student, optimizer, RNG and data position."""
    save_checkpoint(
        run.run_dir,
        step,
        run.accelerator,
        run.state,
        run.pair.tokenizer,
        {"sampler": run.sampler.state_dict()},
        run.cfg.training.keep_checkpoints,
    )


class StepStart:
    """What an update is about to change besides the weights (the data position and every
    RNG), taken before it starts. If the teacher fails to score the update (a server that
    stopped answering or refused a request), no weight has moved yet: `checkpoint` writes the
    state after the previous update, so the same command resumes exactly where an
    uninterrupted run would have been. One process only: under data parallel the periodic
    checkpoints serve (another process may be waiting in a collective)."""

    def __init__(self, run: Run):
        self.run = run
        self.sampler = run.sampler.state_dict()
        self.rng = rng_state()

    def checkpoint(self, step: int) -> None:
        run, acc = self.run, self.run.accelerator
        if step < 1 or acc.num_processes > 1:  # under data parallel the periodic checkpoints serve
            return
        if latest_checkpoint(run.run_dir) is not None and latest_checkpoint(run.run_dir).name == f"step_{step:06d}":
            return
        if not run.weights_finite():  # never checkpoint them (as the periodic checkpoints)
            return
        run.optimizer.zero_grad(set_to_none=True)
        run.sampler.load_state_dict(self.sampler)
        set_rng_state(self.rng)
        checkpoint_run(run, step)
        log.warning("checkpoint step_%06d written (the last finished update) before stopping", step)


class GracefulStop:
    """SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (a scheduler's preemption or time-limit signal, a
    plain kill, Ctrl-C) end the run after the update in flight: the loop checkpoints that
    step and `hand_over` passes the signal on, to the handler that was installed before (the
    submitit launcher's requeue) or as the exit status 128 + signal. A second Ctrl-C stops at
    once. Under data parallel every process learns of a stop through one all-reduce per step,
    so they all checkpoint the same step."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))

    def __init__(self):
        self.signum: int | None = None
        self.remote = False
        self.previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name + (" (on another process)" if self.remote else "")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:  # None: a handler installed from C, which Python cannot put back
                signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: finishing this update, then checkpointing", signal.Signals(signum).name)

    def requested(self, acc: Accelerator) -> bool:
        flag = any_process(acc, self.signum is not None)
        if flag and self.signum is None:  # a signal reached another process
            self.signum, self.remote = signal.SIGTERM, True
        return flag

    def hand_over(self):
        signum, previous = self.signum, self.previous.get(self.signum)
        self.__exit__()
        if callable(previous) and previous is not signal.default_int_handler:  # e.g. submitit: requeue, exit
            previous(signum, None)
        raise SystemExit(128 + signum)


# Keys a resumed run may change: how long it runs, where it reports, where its teacher runs.
RESUMABLE_CHANGES = (
    "training.steps",
    "training.save_every",
    "training.keep_checkpoints",
    "training.allow_inexact_resume",
    "logger.",
    "output_root",
    # where the teacher runs, not which teacher (a restarted server may come up on another node)
    "model_pair.teacher_backend",
    "model_pair.teacher_url",
    "model_pair.teacher_server.",
    "model_pair.teacher_vllm.",
)


def record_run_config(run: Run) -> None:
    """Keep the config this run started with (Hydra rewrites .hydra/ on every launch)."""
    write_json_atomic(run.run_dir / RUN_CONFIG, asdict(run.cfg))
    hydra_dir = run.run_dir / ".hydra"
    if hydra_dir.is_dir():
        first = hydra_dir / "first_launch"
        first.mkdir(exist_ok=True)
        for path in hydra_dir.glob("*.yaml"):
            shutil.copy2(path, first / path.name)


def check_resume_config(cfg: Config, run_dir: Path, is_main: bool) -> None:
    """Refuse to resume a run directory with a different experiment config."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        return
    recorded = read_json_object(path, "restore it from the run's .hydra/ files, or choose a new hydra.run.dir")
    before, now = flatten(recorded), flatten(json.loads(json.dumps(asdict(cfg))))
    defaults = flatten(json.loads(json.dumps(asdict(Config()))))
    for key in set(now) - set(before):  # added by a later version of the harness: the run had its default
        before[key] = defaults.get(key)
    changed = [
        k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]
    if not changed:
        return
    if is_main:
        restore_first_launch(run_dir)  # undo Hydra's rewrite of .hydra/
    diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
    more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
    raise ConfigError(
        f"{run_dir} holds a run with a different config ({diffs}{more}); resume it with its original "
        "overrides, or choose a new hydra.run.dir"
    )


def restore_first_launch(run_dir: Path) -> None:
    """Put back the .hydra/ files of the launch that started the run (Hydra rewrites them on
    every launch, including ones that are refused or find the run finished)."""
    first = run_dir / ".hydra" / "first_launch"
    if first.is_dir():
        for saved in first.glob("*.yaml"):
            shutil.copy2(saved, run_dir / ".hydra" / saved.name)


def _postfix(metrics: dict) -> dict:
    out = {}
    for key, name in (("loss", "loss"), ("grad_norm", "gnorm"), ("response_length", "len"), ("val/accuracy", "val")):
        if isinstance(metrics.get(key), (int, float)):
            out[name] = f"{metrics[key]:.3g}"
    return out


def build_summary(run: Run, status: str, last_step: int, resumed_from, wall_start: float) -> dict:
    cfg = run.cfg
    rows, bad = read_jsonl_lenient(run.run_dir / METRICS) if run.accelerator.is_main_process else ([], [])
    steps = [r for r in rows if r.get("step", 0) > 0]
    vals = [(r["step"], r["val/accuracy"]) for r in rows if r.get("val/accuracy") is not None]
    times = [r["step_time"] for r in steps if r.get("step_time") is not None]
    tps = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s") is not None]
    mems = [r["mem/peak_gb"] for r in steps if r.get("mem/peak_gb") is not None]
    return {
        "status": status,
        "steps": last_step,
        "method": cfg.reward.label,
        "reward": cfg.reward.name,
        "alpha": cfg.reward.alpha if cfg.reward.name in ("power", "box_cox") else None,
        "model_pair": cfg.model_pair.name,
        "teacher": run.pair.teacher_path,
        "student": run.pair.student_path,
        "seed": cfg.seed,
        "val_accuracy_initial": vals[0][1] if vals and vals[0][0] == 0 else None,
        "val_accuracy_final": vals[-1][1] if vals else None,
        "val_accuracy_best": max(v for _, v in vals) if vals else None,
        "median_step_time": statistics.median(times) if times else None,
        "median_tokens_per_s": statistics.median(tps) if tps else None,
        "peak_mem_gb": max(mems) if mems else None,
        "empty_batches": sum(1 for r in steps if r.get("skip_reason", "empty") == "empty" and r.get("skipped")),
        "skipped_updates": sum(1 for r in steps if r.get("skip_reason") in NONFINITE_REASONS),
        "skipped_prompts": run.skipped_prompts,
        "metrics_lines": len(rows),
        "unreadable_metrics_lines": bad,
        # steps 0..last without a metrics line: lost (a cut or corrupted file) before the
        # checkpoint a resume started from, so never redone
        "missing_metrics_steps": sorted(set(range(last_step + 1)) - {r.get("step") for r in rows})
        if run.accelerator.is_main_process
        else [],
        "resumed_from_step": resumed_from,
        "wall_time_s": time.time() - wall_start,
        "processes": run.accelerator.num_processes,
        "device": str(run.accelerator.device),
    }
