"""The Lightning module: objective loss, optimizer with warmup, EMA weights, CFG label dropout,
random flips, and what happens on a non-finite loss (`nan_policy`)."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
from torch import nn

from diffctl.conditioning import IMAGE
from diffctl.denoiser import DiffusionModel
from diffctl.errors import ConfigError, DiffctlError
from diffctl.latents import LATENT, LATENT_STREAM, draw_latents
from diffctl.objectives import Objective
from diffctl.rng import BatchRandom, mix_seed, seed_step
from diffctl.sharding import clip_sharded_grad_norm, strategy_is_sharded
from diffctl.schema.choices import NAN_POLICIES

FLIP_STREAM = 0xF11B  # flips draw from their own keyed stream, so turning them on leaves the noise as it was


class NonFiniteLoss(DiffctlError):
    """The training loss became NaN or infinite (nan_policy=stop)."""


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at optimizer step `step`; with warmup it ramps as (1+n)/(10+n) so the average
    is not dominated by the random initialization early in short runs."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class ParameterAverage:
    """average <- decay * average + (1 - decay) * source in one foreach kernel; buffers copied.

    The tensor lists are gathered once: walking the module tree every step cost 2-3% of a small
    model's training step. Parameters keep their identity through `.to()`, so the lists stay valid."""

    def __init__(self, average: nn.Module, source: nn.Module):
        self.average, self.source = list(average.parameters()), list(source.parameters())
        self.average_buffers, self.source_buffers = list(average.buffers()), list(source.buffers())
        # Under FSDP these are the local shards of flat parameters, which match only if both copies
        # were wrapped alike (diffctl.sharding): a mismatch would average unrelated numbers.
        shapes = [tuple(p.shape) for p in self.average], [tuple(p.shape) for p in self.source]
        if shapes[0] != shapes[1]:
            raise RuntimeError(f"the averaged copy's parameters {shapes[0][:3]}... do not match the network's {shapes[1][:3]}...")

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.average, self.source, 1.0 - decay)
        if self.average_buffers:
            torch._foreach_copy_(self.average_buffers, self.source_buffers)


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        denoiser: DiffusionModel,
        objective: Objective,
        optim: dict[str, Any],
        ema: dict[str, Any],
        config: dict[str, Any] | None = None,
        seed: int = 0,
        random_flip: bool = False,
        nan_policy: str = "stop",
        first_stage: nn.Module | None = None,
    ):
        super().__init__()
        # The whole run config travels in the checkpoint so `sample`/`resume` need nothing else.
        self.save_hyperparameters({"config": config or {}})
        self.denoiser = denoiser
        self.objective = objective
        self.optim_cfg = dict(optim)
        self.ema_cfg = dict(ema)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {' | '.join(NAN_POLICIES)}, got {nan_policy!r}")
        self.nan_policy = nan_policy
        # latent diffusion (diffctl/latent_codec.py): batches hold cached posteriors, drawn into latents here;
        # the frozen codec is kept beside the denoiser (in the checkpoint once, never averaged or optimized)
        self.first_stage = first_stage
        # nan_policy=stop: the first step whose loss was not finite, kept on the device (-1: none) so
        # that checking it costs no host sync per step; `first_nonfinite_step` reads it when needed.
        self._bad_step: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None
        # nan_policy=skip: whether every micro-batch of the current optimizer step had a finite loss.
        self._loss_ok: torch.Tensor | None = None
        self._skip_this_step = False
        self.skipped_steps = 0
        self.ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        self._ema_average: ParameterAverage | None = None  # built when training starts (on_train_start)
        self._target_average: ParameterAverage | None = None
        # Consistency models regress onto an EMA "target" copy with its own decay schedule. It stays in
        # train mode, as in the reference: its dropout runs on the online network's masks (objectives/consistency.py).
        self.target = copy.deepcopy(denoiser).requires_grad_(False) if objective.needs_target else None
        if getattr(objective, "teacher", None) is not None:
            objective.teacher.requires_grad_(False).eval()
            self.teacher = objective.teacher  # registered so it moves with the module to the device

    # --- training --------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x = batch[LATENT] if LATENT in batch else batch[IMAGE]
        trainer = self.trainer
        step, micro = self.global_step, batch_idx % trainer.accumulate_grad_batches
        seed_step(self.seed, step, micro, trainer.global_rank, x.device)  # dropout: same draws on resume
        keyed = (step, micro, trainer.global_rank, trainer.world_size, x.shape[0], x.device)
        flip = None
        if self.random_flip:
            flip = BatchRandom(mix_seed(self.seed, FLIP_STREAM), *keyed).rand((x.shape[0], 1, 1, 1)) < 0.5
        if LATENT in batch:  # the mirrored image's own encoding where flipped, then z ~ q(z | x)
            codec = self.first_stage
            x = draw_latents(x, flip, BatchRandom(mix_seed(self.seed, LATENT_STREAM), *keyed), codec.scale, codec.shift)
        elif flip is not None:
            x = torch.where(flip, x.flip(-1), x)
        rng = BatchRandom(self.seed, *keyed)
        conditioner = self.denoiser.conditioner  # label dropout (CFG's null class) drawn before the objective's noise
        cond = conditioner.drop(conditioner.from_batch(batch, rng), rng)
        loss = self.objective.loss(self.denoiser, x, cond, rng, target=self.target, step=step, batch=batch)
        self._track_finite(loss.detach(), step, micro)
        if self._loss_is_read_at(step):
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _loss_is_read_at(self, step: int) -> bool:
        """Whether a logger, the progress bar or the end-of-run summary reads the loss logged at this
        optimizer step. `self.log` costs about 1 ms of bookkeeping per call, 1-2% of a small model's
        step, so other steps skip it. Loggers write when (step + 1) % log_every_n_steps == 0."""
        trainer = self.trainer
        every = trainer.log_every_n_steps or 0
        bar = trainer.progress_bar_callback
        if bar is not None and getattr(bar, "refresh_rate", 0):
            every = math.gcd(every, bar.refresh_rate)
        last = trainer.max_steps > 0 and step + 1 >= trainer.max_steps
        return last or (every > 0 and (step + 1) % every == 0)

    # --- non-finite losses -------------------------------------------------------------
    def _track_finite(self, loss: torch.Tensor, step: int, micro: int) -> None:
        """Device-side bookkeeping only: no .item(), no host sync."""
        finite = torch.isfinite(loss)
        if self.nan_policy == "skip":
            self._loss_ok = finite if micro == 0 or self._loss_ok is None else self._loss_ok & finite
            return
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = ~finite & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, step), self._bad_step)
        self._bad_loss = torch.where(first, loss.to(self._bad_loss.dtype), self._bad_loss)

    def first_nonfinite_step(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss so far (nan_policy=stop), else None. Syncs."""
        if self._bad_step is None:
            return None
        step = int(self._bad_step)
        return (step, float(self._bad_loss)) if step >= 0 else None

    def weights_finite(self) -> bool:
        """Whether the raw and EMA weights are all finite (one host sync)."""
        params = [p.detach() for m in (self.denoiser, self.ema) for p in m.parameters() if p.is_floating_point()]
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True

    def on_before_optimizer_step(self, optimizer):
        if self.nan_policy != "skip":
            return
        # One host sync per optimizer step, only with nan_policy=skip: the step cannot be skipped
        # without knowing on the host. Gradients are checked too (a finite loss can still overflow in
        # backward), except under fp16 loss scaling, whose GradScaler already skips those steps.
        ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool, device=self.device)
        grads = [p.grad for p in self.denoiser.parameters() if p.grad is not None]
        if grads and self.trainer.precision not in ("16-mixed", "16", "16-true"):
            ok = ok & torch.stack(torch._foreach_norm(grads)).isfinite().all()
        if self.trainer.world_size > 1:  # FSDP: each rank checked only its shard of the gradients
            ok = self.trainer.strategy.reduce_boolean_decision(bool(ok), all=True)
        self._skip_this_step = not bool(ok)
        if self._skip_this_step:
            for p in self.denoiser.parameters():  # an optimizer skips parameters without gradients
                p.grad = None
            self.skipped_steps += 1
            if self.trainer.is_global_zero and (self.skipped_steps <= 10 or self.skipped_steps % 100 == 0):
                print(
                    f"warning: non-finite loss or gradients at step {self.global_step}: optimizer step skipped "
                    f"(nan_policy=skip; {self.skipped_steps} skipped so far)",
                    flush=True,
                )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and strategy_is_sharded(self.trainer):
            clip_sharded_grad_norm(self.trainer, float(gradient_clip_val))  # the norm over all shards
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs):
        self._skip_this_step = False
        super().optimizer_step(*args, **kwargs)
        if self._skip_this_step:  # nan_policy=skip: weights unchanged, so the averages stay as they are
            return
        step = self.global_step  # optimizer steps taken before this one
        self._ema_average.update(ema_decay(step, self.ema_cfg["decay"], self.ema_cfg["warmup"]))
        if self._target_average is not None:
            self._target_average.update(self.objective.target_decay(step))

    def on_train_start(self) -> None:
        # After the strategy placed the module on its device and a resumed run loaded its weights.
        self._ema_average = ParameterAverage(self.ema, self.denoiser)
        self._target_average = ParameterAverage(self.target, self.denoiser) if self.target is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diffctl"] = {"skipped_steps": int(self.skipped_steps)}
        if self.first_stage is not None:  # its tensors are in the state dict; its architecture here
            checkpoint["diffctl"]["first_stage"] = self.first_stage.stored()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("diffctl", {}).get("skipped_steps", 0))

    def configure_optimizers(self):
        cfg = self.optim_cfg
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(cfg["name"])
        if cls is None:
            raise ValueError(f"optim.name must be adam or adamw, got {cfg['name']!r}")
        opt = cls(
            self.denoiser.parameters(),
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
            eps=cfg["eps"],
            weight_decay=cfg["weight_decay"],
            foreach=cfg.get("foreach"),
            fused=cfg.get("fused"),
        )
        warmup = int(cfg["warmup_steps"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
