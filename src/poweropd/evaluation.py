"""Benchmark evaluation: n samples per problem, graded, summarised as the paper's columns.

One code path for every model: a training run's student (read with the run's own saved
model-pair config, so the tokenizer, chat template and stop tokens are the ones it was
trained with), the untrained student or the teacher of a pair, or any Hugging Face id or
local path. For each benchmark of the suite:

    rows --chat template--> prompt ids --backend: n samples each--> responses
         --grader--> (extracted answer, correct, status) per sample --> metrics

Metrics (docs/reference.md §4), c_i = correct samples of problem i out of n:
    Avg@n  = mean_i c_i / n
    Pass@n = mean_i [c_i > 0]
    pass@k = mean_i 1 - C(n - c_i, k) / C(n, k)     (unbiased estimator, k <= n)
    Len    = mean response length in tokens over all samples (stop token included)
plus the truncation rate, extraction-failure rate and grading timeouts. "Mean" averages
each column over the benchmarks of the suite (the paper's Mean over seven).

Outputs, under <out_dir>/eval/:
    <suite>.json                        every benchmark's metrics + Mean + settings (written last)
    <suite>/<benchmark>.json            one benchmark's metrics (its presence: that benchmark is done)
    <suite>/<benchmark>.samples.jsonl   id, sample, response, extracted, correct, status, length
An interrupted evaluation started again skips the benchmarks that are done.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from poweropd.benchmarks import Benchmark, get_benchmark, load_benchmark, suite_benchmarks
from poweropd.checkpoint import checkpoint_in_use
from poweropd.config import EvalConfig, EvaluateConfig, ModelPairConfig
from poweropd.errors import ConfigError
from poweropd.files import FileProblem, read_json_object, read_jsonl_lenient, write_json_atomic, write_text_atomic
from poweropd.generation import Completion, SamplingParams, chat_prompts, sample_completions
from poweropd.grading import Grade, Grader
from poweropd.toy.spec import ToyPairSpec
from poweropd.tracking import FINAL_MODEL, RUN_CONFIG

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


# ----------------------------------------------------------------------------------------
# What is evaluated


@dataclass
class EvalTarget:
    name: str  # human-readable identity, recorded in the results
    model_path: str  # weights (and tokenizer: checkpoints are saved with theirs)
    pair: ModelPairConfig  # chat-template settings and stop tokens
    out_dir: Path  # results go to out_dir/eval/


def target_pair(cfg: EvaluateConfig) -> ModelPairConfig:
    """The pair config that fixes tokenizer, chat template and stop tokens (cheap: no weights).
    For a training run it is the run's own saved one, whatever the command line says."""
    if not cfg.run_dir:
        return cfg.model_pair
    run_dir = Path(cfg.run_dir).expanduser()
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"run_dir={run_dir} holds no {RUN_CONFIG}; point run_dir at a training run directory")
    recorded = read_json_object(run_dir / RUN_CONFIG, "restore it, or evaluate the student folder with model=<path>")
    if not isinstance(recorded.get("model_pair"), dict):
        raise FileProblem(f"{run_dir / RUN_CONFIG} has no model_pair section; restore it, or use model=<path>")
    return pair_config_from_dict(recorded["model_pair"])


def resolve_target(cfg: EvaluateConfig, pair: ModelPairConfig) -> EvalTarget:
    """Turn evaluate.py's config into (weights, chat settings, output folder). Builds the
    toy pair on first use when its spec is not the shipped one."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir).expanduser()
        if cfg.checkpoint == "final":
            path, out = run_dir / FINAL_MODEL, run_dir
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"{run_dir} has no final student ({FINAL_MODEL}/): the run has not finished; "
                    "use checkpoint=latest or checkpoint=step_XXXXXX"
                )
        else:
            from poweropd.checkpoint import latest_checkpoint

            named = run_dir / "checkpoints" / cfg.checkpoint
            path = latest_checkpoint(run_dir) if cfg.checkpoint == "latest" else named
            if path is None or not (path / "config.json").is_file():
                found = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
                raise ConfigError(
                    f"checkpoint={cfg.checkpoint} not found in {run_dir}/checkpoints; "
                    f"available: final, latest, {', '.join(found) or '(none)'}"
                )
            out = run_dir / EVAL_DIR / path.name  # results of a checkpoint: <run>/eval/step_XXXXXX/eval/
        return EvalTarget(f"{run_dir.name}@{path.name}", str(path), pair, out)

    from poweropd.models import resolve_paths

    if cfg.model in ("student", "teacher"):
        teacher, student = resolve_paths(pair)
        path = student if cfg.model == "student" else teacher
        name = f"{pair.name}_{cfg.model}"
    else:
        path, name = cfg.model, _slug(cfg.model)
    return EvalTarget(name, path, pair, Path(cfg.output_root) / "evals" / name)


def pair_config_from_dict(saved: dict) -> ModelPairConfig:
    saved = dict(saved)
    saved["toy"] = ToyPairSpec(**saved.get("toy", {}))
    return ModelPairConfig(**saved)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_")[-80:] or "model"


# ----------------------------------------------------------------------------------------
# Generation backends


class GenerationBackend(Protocol):
    """Samples n completions for each prompt (token ids, chat template already applied)."""

    name: str

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, desc: str) -> list[list[Completion]]:
        """Returns, per prompt, its n completions."""
        ...


class EngineBackend:
    """Evaluation through a rollout engine (poweropd.generation): `hf` generate or `vllm`."""

    def __init__(self, engine, tokenizer, batch_size: int):
        self.engine, self.tokenizer, self.batch_size = engine, tokenizer, batch_size
        self.name = engine.name

    def generate(self, prompts, n, params, desc):
        return sample_completions(self.engine, self.tokenizer, prompts, n, params, self.batch_size, desc)


# ----------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for one problem (Chen et al., 2021),
    as a running product so large n never overflows."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n (got k={k}, n={n})")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def benchmark_metrics(samples: list[dict], n: int) -> dict:
    """Columns of one benchmark from its per-sample records (see the module docstring)."""
    by_problem: dict[str, list[dict]] = {}
    for s in samples:
        by_problem.setdefault(s["id"], []).append(s)
    bad = {pid: len(v) for pid, v in by_problem.items() if len(v) != n}
    if bad:
        raise ValueError(f"expected {n} samples per problem; got {bad}")
    correct = [sum(bool(s["correct"]) for s in v) for v in by_problem.values()]
    problems = len(correct)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if k <= n})
    total = len(samples)
    return {
        "problems": problems,
        "n": n,
        "avg_at_n": sum(c / n for c in correct) / problems,
        "pass_at_n": sum(c > 0 for c in correct) / problems,
        **{f"pass_at_{k}": sum(pass_at_k(n, c, k) for c in correct) / problems for k in ks},
        "length": sum(s["length"] for s in samples) / total,
        "truncation_rate": sum(bool(s["truncated"]) for s in samples) / total,
        "no_answer_rate": sum(s["status"] == "no_answer" for s in samples) / total,
        "timeouts": sum(s["status"] == "timeout" for s in samples),
    }


MEAN_COLUMNS = ("avg_at_n", "pass_at_n", "length", "truncation_rate", "no_answer_rate")


def suite_mean(results: dict[str, dict]) -> dict:
    """Unweighted mean of each column over benchmarks (the paper's Mean column)."""
    return {k: sum(r[k] for r in results.values()) / len(results) for k in MEAN_COLUMNS}


def sample_records(rows: list[dict], completions: list[list[Completion]], grades: list[Grade]) -> list[dict]:
    records, g = [], iter(grades)
    for row, comps in zip(rows, completions):
        for j, comp in enumerate(comps):
            grade = next(g)
            records.append(
                {
                    "id": row["id"],
                    "sample": j,
                    "response": comp.text,
                    "answer": row["answer"],
                    "extracted": grade.extracted,
                    "correct": grade.correct,
                    "status": grade.status,
                    "length": comp.n_tokens,
                    "truncated": comp.truncated,
                }
            )
    return records


def grade_completions(grader: Grader, rows: list[dict], completions: list[list[Completion]]) -> list[Grade]:
    items = [(c.text, row["answer"], row) for row, comps in zip(rows, completions) for c in comps]
    return grader.grade_many(items)


# ----------------------------------------------------------------------------------------
# The evaluation loop


def sampling_params(ec: EvalConfig, max_new_tokens: int) -> SamplingParams:
    greedy = ec.temperature == 0
    return SamplingParams(max_new_tokens, max(ec.temperature, 1e-6), ec.top_p, ec.top_k, greedy=greedy)


def settings_of(ec: EvalConfig, target: EvalTarget, seed: int) -> dict:
    """What must match for a finished benchmark to be reused by a resumed evaluation."""
    keep = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "backend", "limit", "dtype")
    if ec.backend == "lm_eval":
        keep += ("lm_eval_model",)
    return {"model": target.model_path, "seed": seed, **{k: getattr(ec, k) for k in keep}}


def suite_name(ec: EvalConfig, pair: ModelPairConfig) -> str:
    if ec.benchmarks:
        return "+".join(ec.benchmarks)
    if ec.suite == "auto":
        return "toy" if pair.kind == "toy" else "math7"
    return ec.suite


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate the configured model on the configured suite; returns the suite results."""
    ec = cfg.eval
    pair = target_pair(cfg)
    suite = suite_name(ec, pair)
    benchmarks = suite_benchmarks(suite, list(ec.benchmarks) or None)  # bad names fail before any model work
    engine_kind = ec.lm_eval_model if ec.backend == "lm_eval" else ec.backend
    engine_key = "eval.backend" if ec.backend == "vllm" else "eval.lm_eval_model"
    if engine_kind == "vllm":
        from poweropd.vllm_engine import import_vllm

        import_vllm()  # not installed, or broken: one line before anything is built or loaded
        if ec.backend == "lm_eval":
            from poweropd.lm_eval_backend import check_lm_eval_vllm

            check_lm_eval_vllm()
    target = resolve_target(cfg, pair)
    folder = target.out_dir / EVAL_DIR / suite
    settings = settings_of(ec, target, cfg.seed)
    loaded: dict[str, list[dict]] = {}

    def rows_of(bench: Benchmark) -> list[dict]:
        if bench.name not in loaded:
            loaded[bench.name] = load_benchmark(bench.name, ec.data_dir, ec.limit)
        return loaded[bench.name]

    todo = [b for b in benchmarks if not _finished(folder, b, settings, ec.overwrite, rows_of)]
    data = {b.name: rows_of(b) for b in todo}  # data errors before the model loads

    results: dict[str, dict] = {b.name: _read_finished(folder, b) for b in benchmarks if b not in todo}
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        if engine_kind == "vllm":
            check_vllm_target(target, engine_key)
        # A checkpoint of a run that is still training is held against pruning while it loads.
        with checkpoint_in_use(Path(target.model_path)) if cfg.run_dir and cfg.checkpoint != "final" else nullcontext():
            if not Path(target.model_path).is_dir() and cfg.run_dir:
                raise ConfigError(f"checkpoint {target.model_path} was removed before it could load; run again")
            model, tokenizer, stop_ids, pad_id = load_model(target, ec.dtype, weights=engine_kind == "hf")
            check_prompt_sizes(data, getattr(model.config, "max_position_embeddings", None))
            # Each benchmark's prompts are tokenised once: for the context check and for generation.
            prompts_of = {
                name: chat_prompts(
                    tokenizer, [r["problem"] for r in rows], target.pair.instruction, target.pair.enable_thinking
                )
                for name, rows in data.items()
            }
            max_new = _fit_context(model.config, prompts_of, ec.max_new_tokens)
            engine = eval_engine(ec, target, model, stop_ids, pad_id, cfg.seed) if ec.backend != "lm_eval" else None
        backend = None
        if engine is not None:
            # vLLM schedules its own batches: it gets every sample of a benchmark at once.
            batch = ec.batch_size if engine.name == "hf" else max(1, max(len(p) for p in data.values()) * ec.n)
            backend = EngineBackend(engine, tokenizer, batch)
        with Grader(timeout_s=ec.grade_timeout_s) as grader:
            for bench in todo:
                rows = data[bench.name]
                started = time.time()
                torch.manual_seed(_bench_seed(cfg.seed, bench.name))
                if ec.backend == "lm_eval":
                    from poweropd.lm_eval_backend import run_lm_eval

                    completions, extra = run_lm_eval(model, tokenizer, target, bench, rows, ec, max_new, cfg.seed)
                else:
                    prompts = prompts_of[bench.name]
                    completions = backend.generate(prompts, ec.n, sampling_params(ec, max_new), bench.name)
                    extra = {"backend_startup_s": round(getattr(backend.engine, "startup_s", 0.0), 2)}
                records = sample_records(rows, completions, grade_completions(grader, rows, completions))
                metrics = benchmark_metrics(records, ec.n)
                metrics.update(extra)
                metrics.update(
                    label=bench.label,
                    seconds=round(time.time() - started, 2),
                    max_new_tokens_used=max_new,
                    settings=settings,
                )
                _write_jsonl(folder / f"{bench.name}.samples.jsonl", records)
                write_json_atomic(folder / f"{bench.name}.json", metrics)  # last: marks this benchmark done
                results[bench.name] = metrics
                log.info(
                    "%s %s: Avg@%d %.1f%%  Pass@%d %.1f%%  Len %.1f  (%d problems, %.0f s)",
                    target.name,
                    bench.label,
                    ec.n,
                    100 * metrics["avg_at_n"],
                    ec.n,
                    100 * metrics["pass_at_n"],
                    metrics["length"],
                    metrics["problems"],
                    metrics["seconds"],
                )
    ordered = {b.name: results[b.name] for b in benchmarks}
    summary = {
        "suite": suite,
        "model": target.name,
        "model_path": target.model_path,
        "settings": settings,
        "eval_config": asdict(ec),
        "benchmarks": ordered,
        "mean": suite_mean(ordered),
    }
    write_json_atomic(target.out_dir / EVAL_DIR / f"{suite}.json", summary)
    return summary


def evaluate_sweep(cfg: EvaluateConfig) -> dict[str, dict]:
    """Evaluate every finished run under `cfg.sweep_dir` (runs are found by their
    run_config.json + summary.json); benchmarks already done are skipped, so an interrupted
    sweep evaluation can simply be started again."""
    from dataclasses import replace

    root = Path(cfg.sweep_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"sweep_dir={root} does not exist")
    runs = sorted(p.parent for p in root.rglob(RUN_CONFIG) if "checkpoints" not in p.parts)
    if not runs:
        raise ConfigError(f"sweep_dir={root} holds no training runs (no {RUN_CONFIG} below it)")
    results = {}
    for run_dir in runs:
        if not (run_dir / "summary.json").is_file():
            log.warning("%s has not finished (no summary.json); skipped", run_dir)
            continue
        results[str(run_dir)] = evaluate(replace(cfg, sweep_dir=None, run_dir=str(run_dir)))
    return results


def load_model(target: EvalTarget, dtype: str, weights: bool = True):
    """The model (or, with weights=False, a stand-in holding only its config: the vLLM
    paths load the weights themselves) and its tokenizer, through the Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from poweropd.hf_engine import neutralize_generation_defaults
    from poweropd.models import resolve_dtype, stop_token_ids

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"revision": target.pair.revision, "trust_remote_code": target.pair.trust_remote_code}
    if Path(target.model_path).exists():
        kwargs.pop("revision")  # a local folder has no hub revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.model_path, **kwargs)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(
                target.model_path,
                dtype=resolve_dtype(dtype),
                attn_implementation=target.pair.attn_implementation,
                **kwargs,
            )
        else:
            model = ConfigOnly(AutoConfig.from_pretrained(target.model_path, **kwargs))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"could not load {target.model_path} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "check the path or hub id, network access or HF_HOME"
        ) from None
    if weights:
        model.to(device).eval().requires_grad_(False)
        neutralize_generation_defaults(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, stop_token_ids(tokenizer, list(target.pair.stop_tokens)), pad_id


class ConfigOnly:
    """What evaluation needs of a model whose weights an engine loads itself."""

    def __init__(self, config):
        self.config = config


def eval_engine(ec: EvalConfig, target: EvalTarget, model, stop_ids: list[int], pad_id: int, seed: int):
    """The generation engine of `eval.backend` (hf: generate on the loaded model)."""
    from poweropd.engines import make_engine
    from poweropd.models import resolve_dtype

    return make_engine(
        ec.backend,
        stop_ids=stop_ids,
        pad_id=pad_id,
        model=model if ec.backend == "hf" else None,  # vLLM loads the weights itself
        model_path=target.model_path,
        batch_size=ec.batch_size,
        dtype=str(resolve_dtype(ec.dtype)).removeprefix("torch."),
        seed=seed,
        trust_remote_code=target.pair.trust_remote_code,
        vllm=ec.vllm,
        sleep=False,  # nothing else shares the GPU: no sleeping
    )


def check_vllm_target(target: EvalTarget, key: str) -> None:
    """Refuse (one line, before any weights load) a model vLLM cannot run here."""
    from transformers import AutoConfig

    from poweropd.vllm_engine import check_engine_model

    kwargs = {"trust_remote_code": target.pair.trust_remote_code}
    if not Path(target.model_path).exists():
        kwargs["revision"] = target.pair.revision
    config = AutoConfig.from_pretrained(target.model_path, **kwargs)
    check_engine_model(config, "cuda" if torch.cuda.is_available() else "cpu", key)


def check_prompt_sizes(data: dict[str, list[dict]], window: int | None) -> None:
    """Refuse, before tokenising anything, a problem far longer than any context window
    (BYTES_PER_TOKEN_BOUND UTF-8 bytes per token of the model's window)."""
    from poweropd.data import BYTES_PER_TOKEN_BOUND

    if not window:
        return
    for name, rows in data.items():
        for row in rows:
            size = len(row["problem"].encode("utf-8"))
            if size > BYTES_PER_TOKEN_BOUND * window:
                raise ConfigError(
                    f"{name}: problem {row['id']!r} is {size:,} bytes, far more than the model's context window "
                    f"({window} tokens) can hold; fix the data file, or leave that problem out"
                )


def _fit_context(model_config, prompts_of: dict[str, list[list[int]]], wanted: int) -> int:
    """Never ask for more new tokens than the context window leaves after the longest prompt."""
    window = getattr(model_config, "max_position_embeddings", None)
    if not window:
        return wanted
    longest = max(len(p) for prompts in prompts_of.values() for p in prompts)
    room = window - longest
    if room <= 0:
        raise ConfigError(f"the longest prompt ({longest} tokens) fills the model's context window ({window})")
    if room < wanted:
        log.warning("max_new_tokens %d capped to %d by the context window (%d tokens)", wanted, room, window)
    return min(wanted, room)


def _bench_seed(seed: int, name: str) -> int:
    # Each benchmark has its own stream, so a resumed evaluation samples what a full one would.
    return seed * 1_000_003 + sum(ord(ch) * 31**i for i, ch in enumerate(name)) % 1_000_003


def _finished(folder: Path, bench: Benchmark, settings: dict, overwrite: bool, rows_of) -> bool:
    """Whether `bench` is already evaluated with `settings`: its JSON reads back and its
    samples file holds exactly n samples of every problem of its rows (`rows_of(bench)`,
    loaded only for a result whose settings match). A result that does not
    read back, or whose samples do not match it, is set aside (`.corrupt`) and redone."""
    path = folder / f"{bench.name}.json"
    if not path.is_file():
        return False
    try:
        done = read_json_object(path)
    except FileProblem as exc:
        _set_aside(folder, bench, f"{exc}".split(";")[0])
        return False
    if done.get("settings") == settings:
        problem = _samples_problem(folder / f"{bench.name}.samples.jsonl", rows_of(bench), int(settings["n"]))
        if problem is not None:
            _set_aside(folder, bench, problem)
            return False
        log.info("%s already evaluated with these settings (%s); skipping", bench.name, path)
        return True
    if overwrite:
        return False
    changed = sorted(k for k in settings if done.get("settings", {}).get(k) != settings[k])
    raise ConfigError(
        f"{path} was evaluated with different settings ({', '.join(changed)}); "
        "pass eval.overwrite=true to redo it, or evaluate into another output folder"
    )


def _samples_problem(path: Path, rows: list[dict], n: int) -> str | None:
    """Why a samples file does not back its benchmark JSON (count, ids), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    records, bad = read_jsonl_lenient(path)
    if bad:
        return f"{path.name} has {len(bad)} unreadable line(s)"
    per_id: dict = {}
    for record in records:
        per_id[record.get("id")] = per_id.get(record.get("id"), 0) + 1
    expected = {row["id"] for row in rows}
    if set(per_id) != expected or any(count != n for count in per_id.values()):
        found = f"{len(records)} samples of {len(per_id)} problems"
        return f"{path.name} holds {found}, expected {n} of each of {len(expected)}"
    return None


def _set_aside(folder: Path, bench: Benchmark, why: str) -> None:
    for name in (f"{bench.name}.json", f"{bench.name}.samples.jsonl"):
        if (folder / name).exists():
            os.replace(folder / name, folder / f"{name}.corrupt")
    log.warning(
        "%s: %s; kept as *.corrupt beside it, evaluating %s again", folder / f"{bench.name}.json", why, bench.name
    )


def _read_finished(folder: Path, bench: Benchmark) -> dict:
    return read_json_object(folder / f"{bench.name}.json")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def format_table(summary: dict) -> str:
    """A plain-text table of one suite's results (printed by evaluate.py)."""
    rows = [("benchmark", "Avg@n", "Pass@n", "Len", "trunc", "no-ans", "timeouts")]
    for name, m in summary["benchmarks"].items():
        rows.append(
            (
                get_benchmark(name).label,
                f"{100 * m['avg_at_n']:.1f}",
                f"{100 * m['pass_at_n']:.1f}",
                f"{m['length']:.1f}",
                f"{100 * m['truncation_rate']:.1f}%",
                f"{100 * m['no_answer_rate']:.1f}%",
                str(m["timeouts"]),
            )
        )
    mean = summary["mean"]
    if len(summary["benchmarks"]) > 1:
        rows.append(
            (
                "Mean",
                f"{100 * mean['avg_at_n']:.1f}",
                f"{100 * mean['pass_at_n']:.1f}",
                f"{mean['length']:.1f}",
                f"{100 * mean['truncation_rate']:.1f}%",
                f"{100 * mean['no_answer_rate']:.1f}%",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
