"""What diffctl prints on the terminal: Lightning's log lines once and without advertisements, a
training progress bar that counts optimizer steps, a model summary without an unmeasured FLOPs
column, progress bars with counts and ETA for long jobs, and paths printed whole (never cut by
a table or wrapped by the console), so they can be copied from any terminal width, pipe or CI log."""

from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

# Lightning logs these through rank_zero_info: product tips ("💡 Tip: ... litlogger ..."), not information about the run.
_ADVERT_PREFIX = "💡 Tip:"
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERT_PREFIX)


def route_library_logs() -> None:
    """Lightning's log records reach the console once, through the handlers Hydra configured.

    Importing lightning installs console handlers of its own (the `lightning` logger: "INFO: ...",
    and `lightning.pytorch`/`lightning.fabric` when the root logger had none yet); with Hydra's
    root handlers (console + <job>.log) every INFO line was printed twice. Lightning's handlers are
    removed and its records propagate to Hydra's: once on the console, once in the log file."""
    import lightning  # noqa: F401  (its import installs the handlers removed here)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own; a user's file handler is kept
                log.removeHandler(handler)
        log.propagate = True
    for name in _RANK_ZERO_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in log.filters):
            log.addFilter(_NoAdverts())


def cell(value, digits: int = 4) -> str:
    """A result value as a table cell: floats to `digits` significant digits, the rest as str()."""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def value_rows(result: dict, keys, digits: int = 4) -> list[tuple[str, str]]:
    """(key, cell) for each of `keys` that `result` holds a value for (None: left out)."""
    return [(key, cell(result[key], digits)) for key in keys if result.get(key) is not None]


def result_table(title: str, rows) -> Table:
    """The two-column table a command ends with (key | value), cells folded rather than cut."""
    table = Table(title=title)
    table.add_column("", overflow="fold")
    table.add_column("value", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def print_paths(paths: dict[str, object], console: Console | None = None) -> None:
    """One `label: path` line each, never wrapped or shortened: a table cell or the console's line
    breaking would cut a path wider than the terminal ("…" or a newline inside it)."""
    console = console or Console()
    width = max(len(k) for k in paths) if paths else 0
    for label, path in paths.items():
        console.print(f"{label + ':':<{width + 1}} {path}", soft_wrap=True, highlight=False, markup=False)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class JobProgress:
    """Progress of long jobs (feature extraction, downloads, sampling): done/total, elapsed, ETA
    and rate. On a terminal a rich bar; elsewhere (pipes, CI logs, where a rich bar shows only its
    final state) a plain line at each tenth of a slow job (at least 5 s apart) and one at the end,
    so a 4-minute extraction is not silent. `scale` converts counts for display (1e-6: bytes -> MB)."""

    def __init__(self, enabled: bool = True, unit: str = "images", scale: float = 1.0, console: Console | None = None):
        self.enabled, self.unit, self.scale = enabled, unit, scale
        self.console = console or Console()
        self.tasks: dict[int, dict] = {}
        self.rich: Progress | None = None
        if enabled and self.console.is_terminal:
            amount = f"{{task.fields[shown]}} {unit}"
            self.rich = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(amount),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), _Rate(unit, scale),
                                 console=self.console)  # fmt: skip

    def __enter__(self):
        if self.rich is not None:
            self.rich.__enter__()
        return self

    def __exit__(self, *exc):
        if self.rich is not None:
            return self.rich.__exit__(*exc)
        if exc[0] is None:
            for task in self.tasks.values():
                if time.perf_counter() - task["start"] >= 1:  # a line for jobs that took a while
                    self._line(task, final=True)
        return False

    def add_task(self, description: str, total: float | None) -> int:
        key = len(self.tasks)
        self.tasks[key] = {"description": description, "total": total, "done": 0.0, "start": time.perf_counter(),
                           "printed": time.perf_counter(), "tenth": 0}  # fmt: skip
        if self.rich is not None:
            self.tasks[key]["rich"] = self.rich.add_task(description, total=total, shown=self._amount(0, total))
        return key

    def advance(self, key: int, amount: float = 1) -> None:
        task = self.tasks[key]
        task["done"] += amount
        if self.rich is not None:
            self.rich.update(task["rich"], advance=amount, shown=self._amount(task["done"], task["total"]))
        elif self.enabled and task["total"]:
            tenth = int(10 * task["done"] / task["total"])
            if tenth > task["tenth"] and task["done"] < task["total"] and time.perf_counter() - task["printed"] >= 5:
                task["tenth"] = tenth
                self._line(task)

    def _amount(self, done: float, total: float | None) -> str:
        if self.scale == 1:
            return f"{done:.0f}/{total:.0f}" if total else f"{done:.0f}"
        return f"{done * self.scale:.1f}/{total * self.scale:.1f}" if total else f"{done * self.scale:.1f}"

    def _line(self, task: dict, final: bool = False) -> None:
        elapsed = time.perf_counter() - task["start"]
        task["printed"] = time.perf_counter()
        done, total = task["done"], task["total"]
        rate = done * self.scale / elapsed if elapsed > 0 else 0.0
        head = f"{task['description']}: {self._amount(done, total)} {self.unit}"
        if final:
            text = f"{head} in {_clock(elapsed)} ({rate:.1f} {self.unit}/s)"
        else:
            eta = (total - done) * elapsed / done if done else 0.0
            text = f"{head} ({100 * done / total:.0f}%), {_clock(elapsed)} elapsed, eta {_clock(eta)} ({rate:.1f} {self.unit}/s)"
        self.console.print(text, soft_wrap=True, highlight=False, markup=False)


class _Rate(ProgressColumn):
    def __init__(self, unit: str, scale: float):
        super().__init__()
        self.unit, self.scale = unit, scale

    def render(self, task) -> Text:
        return Text(f"{task.speed * self.scale:.1f} {self.unit}/s" if task.speed else f"- {self.unit}/s")


class _StepsColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"step {int(task.completed)}/{int(task.total or 0)}")


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar counts the batches of the current epoch under "Epoch 43/-2" (max_epochs=-1);
    diffctl trains for trainer.max_steps optimizer steps, so with max_steps > 0 the bar is one task
    over the whole run: "step 430/1000", elapsed, remaining, steps/s and the loss. Epoch-based runs
    (max_steps=-1) keep Lightning's per-epoch bar, without a negative epoch total."""

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if self._by_steps():
            return "train"
        max_epochs = self.trainer.max_epochs
        return f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs and max_epochs > 0 else "")

    def configure_columns(self, trainer) -> list:
        columns = super().configure_columns(trainer)
        if trainer.max_steps > 0:  # the step counter replaces the per-epoch batch counter
            columns = [_StepsColumn() if type(c).__name__ == "BatchesProcessedColumn" else c for c in columns]
            columns.insert(0, columns.pop(next(i for i, c in enumerate(columns) if isinstance(c, _StepsColumn))))
            columns = [c for c in columns if not (isinstance(c, TextColumn) and "description" in c.text_format)]
        return columns

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._by_steps():
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # one task for the run, not one per epoch
            self._add_step_task(trainer)
        self.refresh()

    def _add_step_task(self, trainer) -> None:
        self.train_progress_bar_id = self._add_task(trainer.max_steps, self._get_train_description(0))
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)  # a resumed run starts there

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.progress is not None and self.train_progress_bar_id is None:
            self._add_step_task(trainer)  # no epoch start was seen (a mid-epoch resume)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_progress()  # the bar's last state is printed before the run's summary, not after it


class ParamSummary(ModelSummary):
    """Lightning's model summary as a rich table, without its FLOPs column when FLOPs were not measured
    (Lightning counts them only for modules with an example_input_array; otherwise every entry is 0)."""

    _shards_of = 0  # under trainer.strategy=fsdp: the number of processes the counts are 1/N shards of
    _trained = "denoiser"  # the row name of the trained network: its `summary_name` (classifier, autoencoder)

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        self._shards_of = trainer.world_size if isinstance(trainer.strategy, FSDPStrategy) else 0
        self._trained = getattr(getattr(pl_module, "denoiser", None), "summary_name", "denoiser")
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops=0, **kwargs) -> None:  # fmt: skip
        from lightning.pytorch.utilities.model_summary import get_human_readable_count

        # the module's attribute is `denoiser` whatever it trains (checkpoint keys); the table says what it is
        summary_data = [(name, [self._trained if v == "denoiser" else v for v in values] if name == "Name" else values)
                        for name, values in summary_data]  # fmt: skip
        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        table = Table(*(name for name, _ in columns), title="model")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = Console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        what = "EMA/target copies, first stage" if "first_stage" in dict(summary_data).get("Name", []) else "EMA/target copies"
        line = (f"parameters: {get_human_readable_count(trainable_parameters)} trainable, "
                f"{get_human_readable_count(frozen)} non-trainable ({what}), {model_size:.2f} MB in all")  # fmt: skip
        if total_flops:
            line += f", {get_human_readable_count(total_flops)} FLOPs"
        if self._shards_of:
            line += f" on this device (FSDP: each of the {self._shards_of} processes holds a 1/{self._shards_of} shard)"
        console.print(line, highlight=False)
