"""Train a student by on-policy distillation: Hydra composes the run, poweropd.train runs it.

    python run.py                                      # toy pair, vanilla OPD, CPU, minutes
    python run.py reward=power reward.alpha=500        # PowerOPD
    python run.py -m reward=power reward.alpha=0.1,1,10 seed=0,1,2
    accelerate launch run.py model_pair=qwen3_4b_0.6b training=paper reward=power reward.alpha=500

Re-running with hydra.run.dir=<an existing run directory> resumes it from its last
checkpoint (or does nothing if its summary.json says it finished). SIGTERM, SIGINT (Ctrl-C),
SIGUSR1/2 stop a run after the update in flight, with a checkpoint of that step.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from poweropd.cli import check_every_job, check_overrides, cli_overrides, hydra_only_command, remove_refused_run_dir
from poweropd.config import register_configs, to_config
from poweropd.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dictcfg) -> float | None:
    from poweropd.train import train  # heavy imports after the config is known to be valid

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = to_config(dictcfg)
        summary = train(cfg, run_dir)
    except ConfigError as exc:
        remove_refused_run_dir(run_dir)  # a refused run leaves no directory behind
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a second Ctrl-C: the first one asks the run to checkpoint and stop
        print(f"interrupted: {run_dir} keeps its last checkpoint; the same command resumes", file=sys.stderr)
        raise SystemExit(130) from None
    return summary.get("val_accuracy_final")


if __name__ == "__main__":
    try:
        if not hydra_only_command(sys.argv[1:]):  # shell completion, --help, --info go straight to Hydra
            check_overrides(cli_overrides(sys.argv[1:]), CONF_DIR)
            check_every_job(sys.argv[1:], CONF_DIR)  # every job's values, before any starts
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
