"""Training callbacks: periodic EMA sample grids, a final checkpoint, and an end-of-run summary."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from diffctl.images import save_grid, to_uint8
from diffctl.samplers import generate


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves when training ends between two save intervals, so the
    last step's weights are never lost (Lightning only writes last.ckpt if nothing was saved)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end), sample a grid from the EMA weights
    with a fixed seed, save it as PNG under <run>/samples and send it to the logger."""

    def __init__(self, out_dir: str, every_n_steps: int, num: int, sampler: str, steps: int, seed: int = 0):
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps)
        self.num, self.sampler, self.steps, self.seed = int(num), sampler, int(steps), int(seed)
        self.last_path: Path | None = None
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._last_step:
            self._write(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        dm = trainer.datamodule
        labels = None
        if pl_module.conditional:
            labels = torch.arange(self.num, device=pl_module.device) % pl_module.denoiser.num_classes
        images = generate(
            pl_module.ema,
            self.num,
            (dm.channels, dm.resolution, dm.resolution),
            self.sampler,
            self.steps,
            seed=self.seed,
            labels=labels,
            device=pl_module.device,
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        grid = save_grid(to_uint8(images), path)
        self.last_path = path
        for logger in trainer.loggers:
            _log_image(logger, grid, trainer.global_step)


def _log_image(logger, grid, step: int) -> None:
    """grid: uint8 HxWxC numpy array."""
    name = type(logger).__name__
    if name == "TensorBoardLogger":
        logger.experiment.add_image("samples", grid, step, dataformats="HWC")
    elif name == "WandbLogger":
        logger.log_image(key="samples", images=[grid], step=step)


class TrainSummary(L.Callback):
    """Print steps, wall time, images/s and where the outputs are when training ends."""

    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self._start = None
        self._start_step = 0

    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()
        self._start_step = trainer.global_step

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        from rich.console import Console
        from rich.table import Table

        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        steps = trainer.global_step - self._start_step
        dm = trainer.datamodule
        images = steps * dm.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        table = Table(title="diffctl train: done", show_header=False)
        table.add_row("steps", f"{trainer.global_step} ({steps} this run)")
        table.add_row("time", f"{elapsed:.1f} s")
        table.add_row("images/s", f"{images / elapsed:.1f}" if elapsed > 0 else "n/a")
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and math.isfinite(float(loss)):
            table.add_row("last loss", f"{float(loss):.4f}")
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.last_model_path:
                table.add_row("checkpoint", cb.last_model_path)
            if isinstance(cb, SampleGrid) and cb.last_path:
                table.add_row("samples", str(cb.last_path))
        table.add_row("run dir", str(self.run_dir))
        Console().print(table)
