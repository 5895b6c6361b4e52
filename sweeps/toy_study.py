"""The miniature reproduction of the paper on the toy pair, in one command (2 CPU cores):

    python sweeps/toy_study.py                       # calibrate, train, evaluate, report
    python sweeps/toy_study.py --out docs/toy_study  # where report.md and figures go (default)

1. calibration (`python run.py -cd sweeps -cn toy_calibration`): six objectives x three
   learning rates, one seed, scored on the validation split; the learning rate with the best
   mean final validation accuracy becomes the one every method shares (the paper's protocol)
2. training (`python run.py -cd sweeps -cn toy_study training.lr=<chosen>`): the 13 rows of
   Tables 2/3 x 3 seeds, 200 updates each, joblib, 2 runs at a time
   ... then "beyond the paper" (`python run.py -cd sweeps -cn toy_beyond`): the objectives
   of TRL, verl and tinker (JSD, top-k KL, k3 loss, reward-to-go, task reward, Box-Cox) at
   the same learning rate and seeds, 18 runs (--no-beyond skips them)
   ... then the sensitivity runs (`python run.py -cd sweeps -cn toy_sensitivity`): + Tanh, + Clip
   and Full-vocab the way the authors' released code runs them (tau 5, bounds +-5, per-rollout
   token mean with the stop token kept), and Vanilla / PowerOPD alpha=5 with the paper's
   truncated sampling (top_p 0.95, top_k 20), same lr and seeds, 15 runs (--no-sensitivity)
3. evaluation: every run, plus the untrained student and the teacher, Avg@8 / Pass@8 /
   length on the 500 toy test problems (`python evaluate.py sweep_dir=...`)
4. the report: `python -m analysis.report <study>/runs <study>/beyond <study>/evals --calibration
   <study>/calibration --sensitivity <study>/sensitivity --sensitivity <study>/sensitivity_truncated
   --out docs/toy_study` (figures, tables with mean +- std over seeds, learning-rate robustness,
   ordering claims with paired bootstrap intervals, and the same claims under each variant)
Each stage skips what is already done, so an interrupted study is finished by running it
again. Extra arguments after `--` go to every run.py call (e.g. `-- training.steps=50`);
--methods / --seeds / --lrs / --calibration-methods shrink the grid for a quick look.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = "outputs/toy_study"


def stage(title: str, cmd: list[str], capture: bool = False) -> str:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    started = time.time()
    result = subprocess.run(cmd, cwd=ROOT, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    print(f"== {title}: {time.time() - started:.0f} s", flush=True)
    if capture:
        print(result.stdout, flush=True)
        return result.stdout
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/toy_study", help="report folder")
    parser.add_argument("--study", default=STUDY, help="where the runs and evaluations go")
    parser.add_argument("--lr", default=None, help="skip the calibration and use this learning rate")
    parser.add_argument(
        "--methods", default=None, help="study methods (conf/method/), comma-separated (default: all 13)"
    )
    parser.add_argument("--seeds", default=None, help="study seeds, comma-separated (default: 0,1,2)")
    parser.add_argument("--calibration-methods", default=None, help="calibration methods (conf/method/; default: six)")
    parser.add_argument("--lrs", default=None, help="calibration learning rates (default: 1e-4,3e-4,1e-3)")
    parser.add_argument("--eval-args", default="", help="extra evaluate.py overrides, space-separated")
    parser.add_argument("--no-beyond", action="store_true", help="skip the beyond-the-paper objectives")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the authors'-settings / sampling runs")
    parser.add_argument("extra", nargs="*", help="run.py overrides for every run (after --)")
    args = parser.parse_args()
    py = sys.executable
    started = time.time()
    study = args.study.rstrip("/")

    lr = args.lr
    if lr is None:
        grid = [f"method={args.calibration_methods}"] if args.calibration_methods else []
        grid += [f"training.lr={args.lrs}"] if args.lrs else []
        stage(
            "calibrate the shared learning rate (validation split)",
            [py, "run.py", "-cd", "sweeps", "-cn", "toy_calibration", f"output_root={study}", *grid, *args.extra],
        )
        out = stage(
            "choose the learning rate",
            [
                py,
                "-m",
                "analysis.study",
                "choose-lr",
                f"{study}/calibration",
                "--json",
                f"{study}/calibration.json",
            ],
            capture=True,
        )
        lr = out.strip().splitlines()[-1]
    grid = [f"method={args.methods}"] if args.methods else []
    grid += [f"seed={args.seeds}"] if args.seeds else []
    stage(
        f"train every method at lr {lr}",
        [
            py,
            "run.py",
            "-cd",
            "sweeps",
            "-cn",
            "toy_study",
            f"output_root={study}",
            f"training.lr={lr}",
            *grid,
            *args.extra,
        ],
    )
    if not args.no_beyond:
        seeds = [f"seed={args.seeds}"] if args.seeds else []
        stage(
            f"train the objectives beyond the paper at lr {lr}",
            [py, "run.py", "-cd", "sweeps", "-cn", "toy_beyond", f"output_root={study}", f"training.lr={lr}"]
            + seeds
            + args.extra,
        )
    sensitivity = [] if args.no_sensitivity else [f"{study}/sensitivity", f"{study}/sensitivity_truncated"]
    if sensitivity:
        seeds = [f"seed={args.seeds}"] if args.seeds else []
        base = [py, "run.py", "-cd", "sweeps", "-cn", "toy_sensitivity", f"output_root={study}", f"training.lr={lr}"]
        stage(f"train the baselines the authors' way at lr {lr}", base + seeds + args.extra)
        stage(
            f"train Vanilla and PowerOPD with truncated sampling at lr {lr}",
            base
            + ["method=vanilla,power5", "training.top_p=0.95", "training.top_k=20", f"hydra.sweep.dir={sensitivity[1]}"]
            + seeds
            + args.extra,
        )
    pair = [a for a in args.extra if a.startswith("model_pair")]
    evaluation = args.eval_args.split()
    for model in ("student", "teacher"):
        stage(
            f"evaluate the {model}",
            [py, "evaluate.py", f"model={model}", f"output_root={study}", *pair, *evaluation],
        )
    stage("evaluate every run", [py, "evaluate.py", f"sweep_dir={study}/runs", *evaluation])
    roots = [f"{study}/runs"]
    if not args.no_beyond:
        stage("evaluate every run beyond the paper", [py, "evaluate.py", f"sweep_dir={study}/beyond", *evaluation])
        roots.append(f"{study}/beyond")
    for folder in sensitivity:
        stage(f"evaluate every run of {Path(folder).name}", [py, "evaluate.py", f"sweep_dir={folder}", *evaluation])
    report = [py, "-m", "analysis.report", *roots, f"{study}/evals", "--out", args.out]
    if Path(ROOT / study / "calibration").is_dir() or Path(study, "calibration").is_dir():
        report += ["--calibration", f"{study}/calibration"]
    for folder in sensitivity:
        report += ["--sensitivity", folder]
    stage("report", report)
    print(f"\ntoy study done in {(time.time() - started) / 60:.1f} min; report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
