"""Training callbacks that show a run: periodic EMA sample grids (PNG under <run>/samples and the
logger) and the end-of-run summary (a table and <run dir>/train_summary.json)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from diffctl.callbacks import check_finite
from diffctl.files import atomic_write_json
from diffctl.image_conditions import triplets
from diffctl.images import save_grid, to_uint8
from diffctl.samplers import NonFiniteSamples, generate
from diffctl.sharding import strategy_is_sharded


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
            if getattr(pl_module, "nan_policy", None) == "stop":  # no grid of NaN weights
                ckpt = trainer.checkpoint_callback
                check_finite(trainer, pl_module, saving=False, last_good=getattr(ckpt, "last_model_path", None))
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._last_step:
            self._write(trainer, pl_module)

    def _write(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        # Rank 0 samples and writes. Under FSDP every rank samples the same grid (each EMA forward
        # gathers the weight shards from all ranks, so all must call it); rank 0 alone writes it.
        everyone = strategy_is_sharded(trainer) and trainer.world_size > 1
        if not (trainer.is_global_zero or everyone):
            return
        dm = trainer.datamodule
        conditioner = pl_module.ema.conditioner
        targets, num = None, self.num
        if conditioner.extra_channels:  # image-to-image: sources made from the first test images
            targets = _first_images(dm, self.num).to(pl_module.device)
            cond, num = conditioner.preview(targets, self.seed), len(targets)
        else:
            cond = conditioner.for_samples(0, self.num, pl_module.device)  # class i mod K
        codec = getattr(pl_module, "first_stage", None)  # latent diffusion: sample latents, show their decoding
        shape = (dm.channels, dm.resolution, dm.resolution)
        try:
            images = generate(
                pl_module.ema,
                num,
                shape if codec is None else codec.latent_shape(shape),
                self.sampler,
                self.steps,
                seed=self.seed,
                cond=cond,
                device=pl_module.device,
            )
            if codec is not None:
                images = codec.decode(images).clamp(-1, 1)
        except NonFiniteSamples as err:  # a preview: training goes on, the run says why there is no grid
            if trainer.is_global_zero:
                print(f"warning: no sample grid at step {trainer.global_step}: {err}")
            return
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        if targets is None:
            grid = save_grid(to_uint8(images), path)
        else:  # source | output | target, four images a row
            grid = save_grid(to_uint8(triplets(conditioner.shown(cond), images, targets)), path, nrow=12)
        self.last_path = path
        for logger in trainer.loggers:
            _log_image(logger, grid, trainer.global_step)


def _first_images(dm, n: int):
    """The first n images of the test split (unaugmented; the train split if the dataset has none), [n, C, H, W]."""
    from diffctl.conditioning import IMAGE

    try:
        data = dm.dataset("test")
    except Exception:  # noqa: BLE001  a dataset without a test split
        data = dm.dataset("train")
    return torch.stack([data[i][IMAGE] for i in range(min(n, len(data)))])


def _log_image(logger, grid, step: int) -> None:
    """grid: uint8 HxWxC numpy array."""
    name = type(logger).__name__
    if name == "TensorBoardLogger":
        logger.experiment.add_image("samples", grid, step, dataformats="HWC")
    elif name == "WandbLogger":
        logger.log_image(key="samples", images=[grid], step=step)


class TrainSummary(L.Callback):
    """When training ends: steps, wall time, images/s and where the outputs are, as a table and
    appended to <run dir>/train_summary.json (one record per run or resumed segment).

    `steady_images_per_s` is the median over training batches after the first tenth (compilation,
    allocator warm-up), so occasional checkpoint or sample-grid steps do not count; it is what
    scripts/bench_train.py compares with a hand-written loop."""

    def __init__(self, run_dir: str, command: str = "train"):
        self.run_dir, self.command = Path(run_dir), command  # command: named in the table's title
        self._start = None
        self._start_step = 0
        self._batch_ends: list[float] = []
        self.result: dict = {}
        self._ended = False  # on_train_end was reached (teardown also runs after an exception)

    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()
        self._start_step = trainer.global_step
        self._batch_ends = [self._start]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batch_ends.append(time.perf_counter())  # host clock only: no device sync

    def steady_images_per_s(self, images_per_batch: int) -> float | None:
        gaps = [b - a for a, b in zip(self._batch_ends, self._batch_ends[1:])]
        gaps = sorted(gaps[len(gaps) // 10 :])
        return images_per_batch / gaps[len(gaps) // 2] if gaps and gaps[len(gaps) // 2] > 0 else None

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        steps = trainer.global_step - self._start_step
        dm = trainer.datamodule
        per_batch = dm.batch_size * trainer.world_size
        images = steps * per_batch * trainer.accumulate_grad_batches
        steady = self.steady_images_per_s(per_batch)
        loss = trainer.callback_metrics.get("train/loss")
        loss = float(loss) if loss is not None and math.isfinite(float(loss)) else None
        self.result = {
            "global_step": trainer.global_step,
            "steps_this_run": steps,
            "time_s": round(elapsed, 3),
            "images_per_s": round(images / elapsed, 2) if elapsed > 0 else None,
            "steady_images_per_s": round(steady, 2) if steady else None,
            "last_loss": loss,
        }
        self._ended = True

    @rank_zero_only
    def teardown(self, trainer, pl_module, stage):
        """Printed here, after every callback's on_train_end: the checkpoint callback (last in
        Lightning's order) saves the final step there, and the progress bar stops there."""
        if not self._ended:  # an exception ended training: no summary
            return
        self._ended = False
        from rich.console import Console
        from rich.table import Table

        from diffctl.console import print_paths

        r = self.result
        table = Table(title=f"diffctl {self.command}: done", show_header=False)
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")
        table.add_row("steps", f"{r['global_step']} ({r['steps_this_run']} this run)")
        table.add_row("time", f"{r['time_s']:.1f} s")
        table.add_row("images/s", f"{r['images_per_s']} overall, {r['steady_images_per_s']} steady (median batch)")
        if r["last_loss"] is not None:
            table.add_row("last loss", f"{r['last_loss']:.4f}")
        skipped = getattr(pl_module, "skipped_steps", 0)
        if skipped:
            table.add_row("skipped steps", f"{skipped} (non-finite loss or gradients, nan_policy=skip)")
        paths = {}
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.last_model_path:
                paths["checkpoint"] = r["checkpoint"] = cb.last_model_path
            if isinstance(cb, SampleGrid) and cb.last_path:
                paths["samples"] = str(cb.last_path)
        paths["run dir"] = str(self.run_dir)
        Console().print(table)
        print_paths(paths)  # outside the table: a cell would cut or fold a path wider than the terminal
        self._append_record()

    def _append_record(self) -> None:
        path = self.run_dir / "train_summary.json"
        try:  # a resumed run writing into its old directory adds a record; earlier ones are kept
            records = json.loads(path.read_text()) if path.is_file() else []
            records = records if isinstance(records, list) else [records]
        except (OSError, ValueError):
            records = []
        atomic_write_json(path, records + [self.result])
