"""A Hydra callback that gathers the jobs of a `diffctl sample --multirun` sweep into one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def _results() -> tuple[str, ...]:
    """Always shown: what the jobs are compared on. (diffctl.sample_report imports torch: Hydra builds
    this callback before every `diffctl sample`, so it is imported only once a sweep has ended.)"""
    from diffctl.sample_report import METRIC_COLUMNS

    return ("nfe_per_sample", "time_s", "images_per_s", *METRIC_COLUMNS)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """metrics.json of every job under sweep_dir, in job order."""
    paths = [p for p in sweep_dir.glob("*/metrics.json") if p.parent.name.isdigit()]
    return [json.loads(p.read_text()) for p in sorted(paths, key=lambda p: int(p.parent.name))]


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        if not rows:
            return
        from diffctl.files import atomic_write_json

        atomic_write_json(sweep_dir / "summary.json", rows)
        from rich.console import Console
        from rich.table import Table

        # the settings that differ between jobs, then the results
        results = _results()
        settings = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in results]
        varying = [k for k in settings if len({json.dumps(row.get(k)) for row in rows}) > 1]
        keys = varying + [k for k in results if any(row.get(k) is not None for row in rows)]
        table = Table(title=f"diffctl sample sweep ({len(rows)} jobs)")
        for key in keys:
            table.add_column(key)
        for row in rows:
            table.add_row(*(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys))
        console = Console()
        if not console.is_terminal:  # piped to a file or CI log: don't squeeze the columns into 80
            console = Console(width=200)
        console.print(table)
        console.print(f"summary: {sweep_dir / 'summary.json'}")
