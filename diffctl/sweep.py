"""A Hydra callback that gathers the jobs of a `diffctl sample --multirun` (or `diffctl inpaint
--multirun`) sweep into one table and summary.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def _results() -> tuple[str, ...]:
    """sample's results, always shown. (diffctl.sample_report imports torch: Hydra builds this
    callback before every `diffctl sample`, so it is imported only once a sweep has ended.)"""
    from diffctl.sample_report import METRIC_COLUMNS

    return ("nfe_per_sample", "time_s", "images_per_s", *METRIC_COLUMNS)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """metrics.json of every job under sweep_dir, in job order."""
    paths = [p for p in sweep_dir.glob("*/metrics.json") if p.parent.name.isdigit()]
    return [json.loads(p.read_text()) for p in sorted(paths, key=lambda p: int(p.parent.name))]


def summary_keys(rows: list[dict[str, Any]], columns: Sequence[str], outcomes: Sequence[str] = ()) -> list[str]:
    """The table's columns: the settings that differ between jobs (any key of metrics.json that is
    neither in `columns` nor in `outcomes`, the results not shown), then `columns` that any job has."""
    shown = set(columns) | set(outcomes)
    settings = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in shown]
    varying = [k for k in settings if len({json.dumps(row.get(k)) for row in rows}) > 1]
    return varying + [k for k in columns if any(row.get(k) is not None for row in rows)]


class SweepSummary(Callback):
    """conf/<command>.yaml's hydra.callbacks.sweep_summary. command: named in the title; columns:
    shown for every sweep (default: sample's results); outcomes: the other results in metrics.json,
    which differ between any two jobs and so are never listed as a setting that differs."""

    def __init__(self, command: str = "sample", columns: Sequence[str] | None = None, outcomes: Sequence[str] = ()):
        self.command = command
        self.columns = None if columns is None else [str(k) for k in columns]
        self.outcomes = [str(k) for k in outcomes]

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        if not rows:
            return
        from diffctl.files import atomic_write_json

        atomic_write_json(sweep_dir / "summary.json", rows)
        from rich.console import Console
        from rich.table import Table

        keys = summary_keys(rows, _results() if self.columns is None else self.columns, self.outcomes)
        table = Table(title=f"diffctl {self.command} sweep ({len(rows)} jobs)")
        for key in keys:
            table.add_column(key)
        for row in rows:
            table.add_row(*(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys))
        console = Console()
        if not console.is_terminal:  # piped to a file or CI log: don't squeeze the columns into 80
            console = Console(width=200)
        console.print(table)
        console.print(f"summary: {sweep_dir / 'summary.json'}")
