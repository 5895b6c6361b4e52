"""python -m poweropd.bench {kernels,step,overhead,rollout,scaling,teacher,memory,device} [options]"""

from __future__ import annotations

import argparse
import sys

from poweropd.bench import common, kernels, memory, overhead, rollout, step, teacher
from poweropd.bench import device as device_check

BENCHMARKS = {
    "kernels": (
        kernels.add_arguments,
        kernels.run,
        kernels.table,
        kernels.describe,
        "lm-head kernels at the Qwen3 vocabulary",
    ),
    "step": (
        step.add_step_arguments,
        step.run_step,
        step.step_table,
        step.describe,
        "one OPD step: sampled-token vs full-vocab",
    ),
    "overhead": (
        overhead.add_arguments,
        overhead.run,
        overhead.table,
        overhead.describe,
        "harness vs bare loop (toy pair)",
    ),
    "rollout": (
        rollout.add_arguments,
        rollout.run,
        rollout.table,
        rollout.describe,
        "rollout generation: HF generate vs vLLM",
    ),
    "scaling": (
        step.add_scaling_arguments,
        step.run_scaling,
        step.scaling_table,
        step.describe,
        "update cost vs length and batch",
    ),
    "teacher": (
        teacher.add_arguments,
        teacher.run,
        teacher.table,
        teacher.describe,
        "teacher scoring: in the trainer, in-process vLLM, vLLM server",
    ),
    "memory": (
        memory.add_arguments,
        memory.run,
        memory.table,
        memory.describe,
        "memory per process: DDP vs FSDP2 (a model, checked against RSS with --measure)",
    ),
    "device": (
        device_check.add_arguments,
        device_check.run,
        device_check.table,
        device_check.describe,
        "the device check: kernels in bf16, one paper-shaped update, rollouts, served teacher",
    ),
}
ALIASES = {"logprobs": "kernels"}  # the first benchmark's old name


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ALIASES:
        argv[0] = ALIASES[argv[0]]
    parser = argparse.ArgumentParser(prog="python -m poweropd.bench", description="Benchmarks that print numbers.")
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, (add_arguments, *_rest, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
        p.add_argument("--json", default=None, help="write rows + machine here (and the table to the .md beside it)")
    args = parser.parse_args(argv)
    _, run, make_table, describe, _ = BENCHMARKS[args.bench]
    device = common.pick_device(args.cpu)
    setup = describe(args, device)
    print(setup, flush=True)
    rows = run(args, device)
    table = make_table(rows)
    print("\n" + table)
    payload = {
        "benchmark": args.bench,
        "command": common.command_line(args.bench, argv[1:]),
        "machine": common.machine(device),
        "setup": setup,
        "rows": rows,
    }
    common.write_outputs(args.json, payload, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
