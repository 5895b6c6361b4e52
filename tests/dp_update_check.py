"""One OPD update on a fixed global batch of rollouts, under 1 or N processes (a helper of
tests/test_data_parallel.py, not a test itself):

    python tests/dp_update_check.py OUT.pt <overrides>                          # one process
    torchrun --nproc_per_node 2 tests/dp_update_check.py OUT.pt <overrides>      # two, gloo on CPU

Every process samples the same global batch (same seed), keeps its own slice, and runs the
trainer's own opd_update twice on it (a first AdamW step moves every weight by about the
learning rate whatever its gradient; the second one depends on the gradients' sizes); the
main process writes the updated student's parameters and the second update's metrics to
OUT.pt.
Data parallelism (and FSDP2: training.parallel=fsdp2) is right when both commands write the
same parameters.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from poweropd.config import register_configs, to_config
from poweropd.sharding import full_state_dict
from poweropd.train import make_accelerator, opd_update, sample_rollouts, setup_run, training_sampling

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main(out: str, overrides: list[str]) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    acc = make_accelerator(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run = setup_run(cfg, Path(tmp) / "run", acc)
        rows = run.sampler.next_batch(cfg.training.batch_size)
        with torch.random.fork_rng():
            torch.manual_seed(1234)  # the same global batch on every process
            rollouts = sample_rollouts(run, rows, training_sampling(cfg.training))
        share = cfg.training.batch_size // acc.num_processes
        mine = rollouts.select(slice(acc.process_index * share, (acc.process_index + 1) * share))
        for _ in range(2):
            metrics, _ = opd_update(run, mine)
        acc.wait_for_everyone()
        if run.sharded:  # gathered from every process's shards (a collective)
            params = full_state_dict(run.student)
        else:
            params = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
        if acc.is_main_process:
            torch.save({"params": params, "metrics": metrics, "processes": acc.num_processes}, out)
        run.grader.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
