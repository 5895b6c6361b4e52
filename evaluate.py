"""Evaluate a model on math benchmarks: Avg@n, Pass@n and length, as in the paper's Tables 2-3.

    python evaluate.py model=teacher                          # toy teacher, toy test split
    python evaluate.py model=student                          # the untrained toy student
    python evaluate.py run_dir=outputs/runs/<run>             # a run's final student (its own pair config)
    python evaluate.py run_dir=outputs/runs/<run> checkpoint=step_000200
    python evaluate.py sweep_dir=outputs/sweeps/<sweep>         # every finished run of a sweep
    python evaluate.py model_pair=qwen3_4b_0.6b model=teacher eval.data_dir=/data/math   # seven benchmarks
    python evaluate.py model=/path/to/any/hf/model model_pair=custom eval.suite=math500 eval.backend=lm_eval

Results: <run_dir>/eval/<suite>.json (or <output_root>/evals/<model>/eval/ for models outside a
run) with per-sample files beside it. Started again, an evaluation skips finished benchmarks.
"""

import sys
from pathlib import Path

import hydra

from poweropd.cli import EVAL_GROUPS, check_every_job, check_overrides, cli_overrides, hydra_only_command
from poweropd.config import EvaluateConfig, register_configs, to_config
from poweropd.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(dictcfg) -> float | None:
    from poweropd.evaluation import evaluate, evaluate_sweep, format_table  # heavy imports after validation

    try:
        cfg = to_config(dictcfg, EvaluateConfig)
        summaries = list(evaluate_sweep(cfg).values()) if cfg.sweep_dir else [evaluate(cfg)]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for summary in summaries:
        print(f"\n{summary['model']} on {summary['suite']} (n={summary['settings']['n']}):")
        print(format_table(summary))
    return summaries[-1]["mean"]["avg_at_n"] if summaries else None


if __name__ == "__main__":
    try:
        if not hydra_only_command(sys.argv[1:]):
            check_overrides(cli_overrides(sys.argv[1:]), CONF_DIR, EvaluateConfig, EVAL_GROUPS)
            check_every_job(sys.argv[1:], CONF_DIR, EvaluateConfig)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
