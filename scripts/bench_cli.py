#!/usr/bin/env python
"""CLI start-up: how long `diffctl` takes to answer when it does no work, as a whole process.

    python scripts/bench_cli.py                        # 15 runs of each command, about 2 minutes on 2 CPU cores
    python scripts/bench_cli.py --quick                # 5 runs each: a smoke run
    python scripts/bench_cli.py --against /path/to/other/bin/diffctl   # side by side with another install

Rows, each the real console script in a fresh process, in an empty working directory:
- `diffctl --help`: the commands and config groups (goal: <= 1 s on 2 idle cores);
- `diffctl train --help`: Hydra composes train's config and prints its groups (goal <= 3 s);
- `diffctl train optim.lr=-1`: a config error, one line and exit 1 (goal <= 3 s);
- `diffctl train +no_such_key=1`: an unknown key, one line and exit 1 (goal <= 3 s);
- `diffctl sample steps=0`: a config error of sample (its sampler nodes unchecked until torch: goal <= 3 s);
- `diffctl sample sampler=ddim sampler.eta=2`: a sampler option error, which imports torch (goal <= 3 s).
Each run's exit status and its first stderr line are checked against what the row expects, so a run
that failed another way is reported rather than timed. Wall time from start to exit (perf_counter
around the child); the median of --runs after --warmup runs, min and max beside it. With --against,
the two installs run in turn (A B A B ...) so drifts in machine load hit them alike, and each pair
gives a ratio (this install / the other): its median is the figure to quote on a shared machine.
Written to scripts/results/bench_cli.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, arguments, expected exit status, first stderr line starts with (None: not checked), goal in s)
ROWS = [
    ("--help", ["--help"], 0, None, 1.0),
    ("train --help", ["train", "--help"], 0, None, 3.0),
    ("train optim.lr=-1", ["train", "optim.lr=-1"], 1, "error: optim.lr must be > 0, got -1", 3.0),
    ("train +no_such_key=1", ["train", "+no_such_key=1"], 1, "error: no_such_key: no such config key", 3.0),
    ("sample steps=0", ["sample", "steps=0"], 1, "error: steps must be a positive integer, got 0", 3.0),
    # a sampler key: the samplers declare their options in modules that import torch (diffctl/samplers/registry.py)
    ("sample sampler.eta=2", ["sample", "sampler=ddim", "sampler.eta=2"], 1, "error: sampler.eta must be in [0, 1]", 3.0),
]


def this_install() -> list[str]:
    """The console script installed next to this interpreter (as a user runs it), else python -m diffctl."""
    script = Path(sys.executable).parent / "diffctl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "diffctl"]


def run_once(command: list[str], args: list[str], work: Path, index: int, expect_code: int, expect_err: str | None) -> float:
    """Seconds one run takes; RuntimeError when it did not answer as the row expects."""
    extra = [f"hydra.run.dir={work / f'run-{index}'}"] if expect_code else []  # errors still create a run directory
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    start = time.perf_counter()
    done = subprocess.run([*command, *args, *extra], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    first = (done.stderr.strip().splitlines() or [""])[0]
    if done.returncode != expect_code or (expect_err is not None and not first.startswith(expect_err)):
        raise RuntimeError(f"{' '.join(command + args)}: exit {done.returncode}, stderr {first!r} (expected exit {expect_code}"
                           + (f", {expect_err!r})" if expect_err else ")"))
    return seconds


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": [round(t, 4) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="counted runs of each command (per install)")
    parser.add_argument("--warmup", type=int, default=1, help="runs not counted, first (file cache, .pyc)")
    parser.add_argument("--quick", action="store_true", help="5 runs each: a smoke run")
    parser.add_argument("--against", help="another install's diffctl console script, run in turn with this one")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_cli.json"))
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs
    installs = {"this": this_install()}
    if args.against:
        installs["against"] = [shutil.which(args.against) or args.against]
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "runs": runs,
        "warmup": args.warmup,
        "installs": {k: " ".join(v) for k, v in installs.items()},
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        for name, cli_args, code, err, goal in ROWS:
            times: dict[str, list[float]] = {k: [] for k in installs}
            for i in range(args.warmup + runs):
                for key, command in installs.items():  # in turn: A B A B ...
                    seconds = run_once(command, cli_args, work, len(list(work.iterdir())), code, err)
                    if i >= args.warmup:
                        times[key].append(seconds)
            row = {"command": f"diffctl {name}", "goal_s": goal, **{key: stats(t) for key, t in times.items()}}
            if "against" in times:
                ratios = [a / b for a, b in zip(times["this"], times["against"])]
                row["ratio_this_over_against"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            row["meets_goal"] = row["this"]["median_s"] <= goal
            report["rows"].append(row)
            line = f"{row['command']:<32} median {row['this']['median_s']:6.3f} s (min {row['this']['min_s']:.3f}, max {row['this']['max_s']:.3f}; goal <= {goal:g} s)"
            if "against" in row:
                line += f" | against {row['against']['median_s']:6.3f} s, ratio median {row['ratio_this_over_against']['median']:.3f}"
            print(line, flush=True)
    report["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
