"""The Lightning module: objective loss, optimizer with warmup, EMA weights, CFG label dropout."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import nn

from diffctl.denoiser import Denoiser
from diffctl.objectives import Objective
from diffctl.rng import BatchRandom


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at optimizer step `step`; with warmup it ramps as (1+n)/(10+n) so the average
    is not dominated by the random initialization early in short runs."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def lerp_parameters(average: nn.Module, source: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * source, in one foreach kernel; buffers copied."""
    avg = [p for p in average.parameters()]
    src = [p.detach() for p in source.parameters()]
    torch._foreach_lerp_(avg, src, 1.0 - decay)
    for b_avg, b_src in zip(average.buffers(), source.buffers()):
        b_avg.copy_(b_src)


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        denoiser: Denoiser,
        objective: Objective,
        optim: dict[str, Any],
        ema: dict[str, Any],
        conditional: bool = False,
        label_dropout: float = 0.1,
        config: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        # The whole run config travels in the checkpoint so `sample`/`resume` need nothing else.
        self.save_hyperparameters({"config": config or {}})
        self.denoiser = denoiser
        self.objective = objective
        self.optim_cfg = dict(optim)
        self.ema_cfg = dict(ema)
        self.conditional = bool(conditional)
        self.label_dropout = float(label_dropout)
        self.seed = int(seed)
        self.ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        # Consistency models regress onto an EMA "target" copy with its own decay schedule.
        self.target = copy.deepcopy(denoiser).requires_grad_(False) if objective.needs_target else None
        if getattr(objective, "teacher", None) is not None:
            objective.teacher.requires_grad_(False).eval()
            self.teacher = objective.teacher  # registered so it moves with the module to the device

    # --- training --------------------------------------------------------------------
    def _labels(self, y: torch.Tensor, rng: BatchRandom) -> torch.Tensor | None:
        if not self.conditional:
            return None
        drop = rng.rand(y.shape) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.denoiser.num_classes), y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        trainer = self.trainer
        rng = BatchRandom(
            self.seed,
            self.global_step,
            batch_idx % trainer.accumulate_grad_batches,
            trainer.global_rank,
            trainer.world_size,
            x.shape[0],
            x.device,
        )
        loss = self.objective.loss(
            self.denoiser, x, self._labels(y, rng), rng, target=self.target, step=self.global_step
        )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        step = self.global_step  # optimizer steps taken before this one
        lerp_parameters(self.ema, self.denoiser, ema_decay(step, self.ema_cfg["decay"], self.ema_cfg["warmup"]))
        if self.target is not None:
            lerp_parameters(self.target, self.denoiser, self.objective.target_decay(step))

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
