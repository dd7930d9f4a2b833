"""Training callbacks that keep a run safe: checkpoints (atomic, on signals, never of non-finite
weights) and the data position on resume. What a run shows (sample grids, the end-of-run summary)
is in diffctl/train_outputs.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from diffctl.errors import DiffctlError
from diffctl.files import atomic_link, remove_stale_temporaries
from diffctl.module import NonFiniteLoss
from diffctl.rng import GlobalBatchSampler, batches_consumed
from diffctl.signals import install, restore, signal_name


class TrainingInterrupted(DiffctlError):
    """SIGTERM/SIGINT stopped training after a checkpoint was saved."""


def _stop_all_ranks(trainer: L.Trainer, error: DiffctlError):
    """Raise `error` on global rank 0 (the CLI prints it as one line) and a quiet exit on the other
    ranks, which reached the same decision at the same step: one message, not one per process."""
    if trainer.global_rank == 0:
        raise error
    raise SystemExit(1)


def check_finite(trainer: L.Trainer, pl_module, saving: bool, last_good: str | None = None) -> None:
    """Raise NonFiniteLoss if a loss so far was NaN/Inf (nan_policy=stop) or, before a save, if the
    weights are not finite. Syncs with the device; called only at saves, grids and every
    log_every_n_steps steps, never per step. All DDP ranks take the same decision."""
    bad = pl_module.first_nonfinite_step() if hasattr(pl_module, "first_nonfinite_step") else None
    weights_ok = pl_module.weights_finite() if saving and hasattr(pl_module, "weights_finite") else True
    problem = bad is not None or not weights_ok
    if trainer.world_size > 1:
        problem = trainer.strategy.reduce_boolean_decision(problem, all=False)
    if not problem:
        return
    where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written before it"
    if bad is not None:
        step, value = bad
        what = f"the training loss of step {step + 1} is {value}"
    else:
        what = f"the weights are no longer finite at step {trainer.global_step}"
    _stop_all_ranks(trainer, NonFiniteLoss(
        f"{what}; stopped at step {trainer.global_step} without saving (nan_policy=stop), {where}. "
        "Try a lower optim.lr, more optim.warmup_steps or trainer.gradient_clip_val, or nan_policy=skip"
    ))


class DataPosition(L.Callback):
    """Point diffctl's batch sampler at the next unseen batch at every epoch start.

    Lightning's own set_epoch never reaches a batch sampler, and after a resume Lightning's epoch
    counter can run ahead of the data (a run that ended at max_steps mid-epoch is restored as the
    start of the next epoch). The number of processed batches is exact in every case."""

    def on_train_epoch_start(self, trainer, pl_module):
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        for loader in loaders:
            sampler = getattr(loader, "batch_sampler", None)
            if isinstance(sampler, GlobalBatchSampler):
                sampler.seek(batches_consumed(trainer))


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for diffctl runs:

    - also saves when training ends between two save intervals, so the last step's weights are
      never lost (Lightning only writes last.ckpt if nothing was saved);
    - every file appears atomically (the Trainer gets diffctl.checkpoint.AtomicCheckpointIO; the
      last.ckpt link is made here with a rename too), and stale temporaries of killed runs are removed;
    - never writes non-finite weights, and with nan_policy=stop ends training with NonFiniteLoss;
    - on SIGTERM or SIGINT finishes the current step, saves, and ends with TrainingInterrupted.
    """

    def __init__(self, *args, nan_check_every: int = 50, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_check_every = max(int(nan_check_every), 1)
        self._stop_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self._slurm_requeue = False
        self._forward = None
        self._seen_step = 0

    # --- setup / teardown ------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            remove_stale_temporaries(self.dirpath)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._seen_step = trainer.global_step
        self._install_signal_handlers(trainer)

    def teardown(self, trainer, pl_module, stage):
        self._restore_signal_handlers()
        super().teardown(trainer, pl_module, stage)

    # --- signals ---------------------------------------------------------------------
    def _install_signal_handlers(self, trainer) -> None:
        """SIGTERM (preemption) and SIGINT (Ctrl-C) ask to stop after the current step.

        Installed in on_train_start, i.e. after Lightning's own handlers (Trainer._run registers them
        before training starts; Trainer teardown puts the handlers from before fit back).
        - SIGTERM under SLURM with auto-requeue: Lightning's handler stays in place untouched (its
          SIGUSR1 handler saves hpc_ckpt_*.ckpt and requeues the job, and its SIGTERM handler must
          then not kill the job); we only read `trainer.received_sigterm`, which it sets, and still
          save a step checkpoint at the end of the step if the process gets that far.
        - SIGTERM anywhere else: replaced by ours. Lightning's would raise SIGTERMException at the
          end of the step (after the checkpoint callbacks ran, so nothing would be saved); ours sets
          a flag that on_train_batch_end acts on, and forwards the signal to DDP ranks that
          Lightning launched itself, as Lightning's does.
        - SIGINT: ours; a second Ctrl-C raises KeyboardInterrupt at once (Lightning then exits
          without saving).
        Signal handlers can only be set from the main thread; elsewhere nothing is installed.
        """
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        env = getattr(trainer._accelerator_connector, "cluster_environment", None)
        self._slurm_requeue = isinstance(env, SLURMEnvironment) and bool(env.auto_requeue)
        launcher = trainer.strategy.launcher
        self._forward = getattr(launcher, "kill", None) if trainer.is_global_zero else None
        self._stop_signal = None
        signums = [signal.SIGINT] if self._slurm_requeue else [signal.SIGINT, signal.SIGTERM]
        self._previous_handlers = install(signums, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        restore(self._previous_handlers)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        # No printing here: the main thread may be inside a write to the same stream.
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt
        first = self._stop_signal is None
        self._stop_signal = signum
        if first and signum == signal.SIGTERM and self._forward is not None:
            self._forward(signum)

    def _stop_requested(self, trainer) -> int | None:
        signum = self._stop_signal
        if signum is None and trainer.received_sigterm:  # SLURM, or a SIGTERM before on_train_start
            signum = signal.SIGTERM
        if trainer.world_size > 1:  # one collective per step, DDP only: all ranks must stop together
            stop = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
            signum = (signum or signal.SIGTERM) if stop else None
        return signum

    # --- saving ----------------------------------------------------------------------
    def _last_good(self, trainer) -> str | None:
        return self._last_checkpoint_saved or self.last_model_path or (str(trainer.ckpt_path) if trainer.ckpt_path else None)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        check_finite(trainer, trainer.lightning_module, saving=True, last_good=self._last_good(trainer))
        super()._save_checkpoint(trainer, filepath)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        """last.ckpt as a second name of the step checkpoint just written, replaced atomically
        (Lightning removes the old link first and then links or copies, leaving a window)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_link(filepath, linkpath)
        trainer.strategy.barrier()

    def _save_now(self, trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def _check_due(self, trainer, step: int) -> bool:
        every = self._every_n_train_steps
        return step % self.nan_check_every == 0 or (every > 0 and step % every == 0) or step >= trainer.max_steps > 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(pl_module, "nan_policy", None) == "stop" and self._check_due(trainer, trainer.global_step):
            check_finite(trainer, pl_module, saving=False, last_good=self._last_good(trainer))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Act on a stop request only where an optimizer step just ended: a checkpoint taken in the
        # middle of gradient accumulation would skip the accumulated micro-batches on resume.
        stepped, self._seen_step = trainer.global_step != self._seen_step, trainer.global_step
        if not stepped:
            return
        signum = self._stop_requested(trainer)
        if signum is None:
            return
        self._save_now(trainer)
        run_dir = Path(self.dirpath).parent if self.dirpath else Path(".")
        _stop_all_ranks(trainer, TrainingInterrupted(
            f"stopped by {signal_name(signum)} after step {trainer.global_step}; "
            f"saved {self._last_checkpoint_saved or self.last_model_path}. "
            f"Continue with: diffctl train resume={run_dir}"
        ))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_now(trainer)
        super().on_train_end(trainer, pl_module)
