"""The miniature reproduction of the paper on the toy pair, in one command (2 CPU cores):

    python sweeps/toy_study.py                       # train 39 runs, evaluate, report
    python sweeps/toy_study.py --out docs/toy_study  # where report.md and figures go (default)

1. training: `python run.py -cd sweeps -cn toy_study` (13 methods x 3 seeds, joblib, 2 at a time)
2. evaluation: every run, plus the untrained student and the teacher, Avg@8 / Pass@8 / length
   on the 500 toy test problems (`python evaluate.py sweep_dir=...`)
3. the report: `python -m analysis.report outputs/toy_study --out docs/toy_study`
Each step skips what is already done, so an interrupted study is finished by running it again.
Extra arguments after `--` go to run.py (e.g. `-- training.steps=50` for a quick look).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = "outputs/toy_study"


def step(title: str, cmd: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    started = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"== {title}: {time.time() - started:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/toy_study", help="report folder")
    parser.add_argument("--study", default=STUDY, help="where the runs and evaluations go")
    parser.add_argument("extra", nargs="*", help="run.py overrides (after --)")
    args = parser.parse_args()
    py = sys.executable
    started = time.time()
    step(
        "train",
        [py, "run.py", "-cd", "sweeps", "-cn", "toy_study", f"output_root={args.study}", *args.extra],
    )
    for model in ("student", "teacher"):
        step(f"evaluate the {model}", [py, "evaluate.py", f"model={model}", f"output_root={args.study}"])
    step("evaluate every run", [py, "evaluate.py", f"sweep_dir={args.study}/runs"])
    step("report", [py, "-m", "analysis.report", args.study, "--out", args.out])
    print(f"\ntoy study done in {(time.time() - started) / 60:.1f} min; report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
