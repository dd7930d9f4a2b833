"""`diffctl distill`: progressive distillation (Salimans & Ho 2022), round after round.

Round k is an ordinary `diffctl train objective=progressive` run in <run dir>/round_<k>: its teacher
is round k-1's student (round 1's the checkpoint `ckpt=` names), its student samples with
teacher_steps / 2^k DDIM steps. Each round runs as its own `diffctl train` process, so everything a
training run does holds for it (exact resume, DDP, checkpoints, sample grids, signals), and a round
can be rerun or inspected by hand with the command line written in its distill.json entry.
`diffctl distill resume=<run dir>` continues where the run stopped: finished rounds are kept, an
interrupted one continues from its last checkpoint (`train resume=` in its own directory).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffctl.checkpoint import checkpoint_config, load_checkpoint, resolve_checkpoint
from diffctl.errors import ConfigError, DiffctlError
from diffctl.files import atomic_write_json
from diffctl.rundir import claims_run_dir
from diffctl.schema import validate
from diffctl.signals import interruptible

PLAN = "distill.json"  # in the run directory: the plan (what resume= continues) and each round's result
PLAN_KEYS = ("ckpt", "teacher_steps", "rounds", "steps_per_round", "train_overrides")


class RoundFailed(DiffctlError):
    """A round's `diffctl train` process ended with an error (it printed it)."""


def override_value(v: Any) -> str:
    """A Python value as a Hydra command-line value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(override_value(x) for x in v) + "]"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def data_overrides(teacher_cfg: dict) -> list[str]:
    """The teacher's data config as `diffctl train` overrides: the student trains on the teacher's data."""
    data = teacher_cfg.get("data") or {}
    name = data.get("name")
    return ([f"data={name}"] if name else []) + [f"data.{k}={override_value(v)}" for k, v in data.items() if k != "_target_"]


def make_plan(cfg: DictConfig) -> dict:
    """The plan of a new run, checked before any work: the teacher loads and is a diffusion model's
    checkpoint, and the step counts halve `rounds` times to a whole number."""
    if not cfg.ckpt:
        raise ConfigError("ckpt must name the teacher: a `diffctl train` run directory or .ckpt (e.g. ckpt=outputs/train/<date>/<time>)")
    path = resolve_checkpoint(cfg.ckpt, "ckpt")
    teacher_cfg = checkpoint_config(load_checkpoint(path, "ckpt"), path)
    if teacher_cfg.get("kind"):
        raise ConfigError(f"ckpt={path} holds a {teacher_cfg['kind']} checkpoint; distil a diffusion model's")
    steps, rounds = int(cfg.teacher_steps), int(cfg.rounds)
    if steps % 2**rounds:
        raise ConfigError(f"teacher_steps must be divisible by 2^rounds = {2**rounds} (each round halves the steps), got {steps}; "
                          f"e.g. teacher_steps={2**rounds * max(1, round(steps / 2**rounds))}")  # fmt: skip
    plan = {key: OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key] for key in PLAN_KEYS}
    return {**plan, "ckpt": str(path), "data": data_overrides(teacher_cfg), "rounds_done": []}


def read_plan(run: Path, name: str = PLAN, command: str = "distill") -> dict:
    """The plan file `name` of a `diffctl <command>` run directory, for resume=."""
    import json

    path = run / name
    if not path.is_file():
        raise ConfigError(f"resume={run}: not a `diffctl {command}` run directory (no {name})")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"resume={run}: {path} does not parse as JSON ({err})") from None


def round_command(plan: dict, k: int, run: Path) -> list[str]:
    """`diffctl train` arguments of round k (1-based): fresh, or continuing its own last checkpoint."""
    round_dir = run / f"round_{k}"
    teacher = plan["ckpt"] if k == 1 else str(run / f"round_{k - 1}")
    student_steps = plan["teacher_steps"] // 2**k
    args = ["train", "objective=progressive", f"objective.teacher={override_value(teacher)}", f"objective.student_steps={student_steps}",
            *plan["data"], f"trainer.max_steps={plan['steps_per_round']}", *plan["train_overrides"],
            f"hydra.run.dir={override_value(str(round_dir))}"]  # fmt: skip
    if (round_dir / "checkpoints" / "last.ckpt").is_file():
        args.append(f"resume={override_value(str(round_dir))}")
    return args


def round_step(round_dir: Path) -> int:
    """The optimizer step of a round's last checkpoint (0: none yet)."""
    last = round_dir / "checkpoints" / "last.ckpt"
    return int(load_checkpoint(last, "a round's checkpoint").get("global_step", 0)) if last.is_file() else 0


def run_round(args: list[str], what: str = "a round's") -> None:
    """One round as its own process; it prints its own progress and errors. A signal that stops this
    process reaches the round (Ctrl-C reaches the whole process group; SIGTERM is passed on), whose
    checkpoints stay for resume=."""
    proc = subprocess.Popen([sys.executable, "-m", "diffctl", *args])
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code != 0:
        raise RoundFailed(f"{what} `diffctl {args[0]}` exited with status {code} (its error is above)")


def _kept(cfg) -> str:
    run = Path(str(cfg.resume)).expanduser() if cfg.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    return f"finished rounds and the last checkpoint of the current one are kept in {run}; continue with: diffctl distill resume={run}"


@claims_run_dir("distill")
@interruptible(_kept)
def distill(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg, "distill")
    if cfg.get("resume"):
        run = Path(str(cfg.resume)).expanduser().resolve()
        plan = read_plan(run)
    else:
        run = Path(HydraConfig.get().runtime.output_dir).resolve()
        plan = make_plan(cfg)
        atomic_write_json(run / PLAN, plan)
    for k in range(1, plan["rounds"] + 1):
        round_dir = run / f"round_{k}"
        steps = plan["teacher_steps"] // 2**k
        if round_step(round_dir) >= plan["steps_per_round"]:
            print(f"round {k}/{plan['rounds']}: done ({steps} steps), kept in {round_dir}")
            continue
        print(f"round {k}/{plan['rounds']}: {2 * steps} -> {steps} DDIM steps, {plan['steps_per_round']} training steps in {round_dir}")
        args = round_command(plan, k, run)
        run_round(args)
        plan["rounds_done"] = [r for r in plan["rounds_done"] if r["round"] != k]
        plan["rounds_done"].append({"round": k, "student_steps": steps, "run_dir": str(round_dir),
                                    "command": "diffctl " + " ".join(args), **_last_loss(round_dir)})  # fmt: skip
        atomic_write_json(run / PLAN, plan)
    return report(plan, run)


def _last_loss(round_dir: Path) -> dict:
    import json

    summary = round_dir / "train_summary.json"
    try:
        records = json.loads(summary.read_text())
        last = records[-1] if isinstance(records, list) else records
        return {"last_loss": last.get("last_loss")}
    except (OSError, ValueError, AttributeError, IndexError):
        return {}


def report(plan: dict, run: Path) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from diffctl.console import cell, print_paths

    rounds = sorted(plan["rounds_done"], key=lambda r: r["round"])
    table = Table(title="diffctl distill: done")
    for column in ("round", "DDIM steps", "last loss"):
        table.add_column(column, overflow="fold")
    for r in rounds:
        table.add_row(str(r["round"]), str(r["student_steps"]), cell(r["last_loss"]) if r.get("last_loss") is not None else "")
    console = Console()
    console.print(table)
    console.print("sample round k with: diffctl sample ckpt=<its run dir> sampler=ddim steps=<its DDIM steps>", highlight=False)
    print_paths({**{f"round {r['round']}": r["run_dir"] for r in rounds}, "results": run / PLAN}, console)
    return {"run_dir": str(run), "rounds": plan["rounds_done"]}
