"""`trainer.strategy=fsdp`: fully sharded data parallel training (PyTorch FSDP through Lightning).

DDP keeps a whole copy of the weights, gradients, Adam moments and EMA on every device; FSDP keeps
1/N of each (N: processes) and gathers one wrapped unit's full weights only while it runs.

How diffctl wraps the module (`ShardedStrategy`):
- every `DiffusionModel` (the online network, its EMA copy, the consistency target) is an FSDP unit, and
  so is every DiT block inside it (`block_classes`), so only one block's weights are whole at a time;
- `use_orig_params=False`: each unit's parameters are one flat tensor, sharded the same way in the
  online network and its EMA copy (same module tree, same parameter order and shapes), so the EMA
  update stays one elementwise lerp between matching local shards (module.ParameterAverage);
- checkpoints are Lightning's "full" state dict: gathered on global rank 0 and written as one .ckpt
  with the same keys as a DDP or single-device run, so `diffctl sample`/`export`/`resume` read it
  like any other (torch.load(weights_only=True)); resuming needs the same strategy (FSDP's
  optimizer state is keyed by parameter name).

Settings FSDP cannot keep are refused in `check_sharding` (one line naming the key).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from diffctl.errors import ConfigError

SHARDED = "fsdp"  # the trainer.strategy value diffctl shards with


def block_classes() -> set[type]:
    """The module classes wrapped as their own FSDP unit. DiT blocks each are one; a U-Net is one unit
    with its DiffusionModel (its forward tells its blocks apart by class, which a wrapper would hide; the
    U-Nets here are small next to a DiT-XL)."""
    from diffctl.denoiser import DiffusionModel
    from diffctl.networks.dit import DiTBlock

    return {DiffusionModel, DiTBlock}


class ShardedStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with diffctl's wrapping (module doc). A subclass also runs on CPU
    processes (gloo): Lightning refuses the plain "fsdp" string without a GPU, not its subclasses."""

    def __init__(self, **kwargs: Any):
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        super().__init__(
            auto_wrap_policy=ModuleWrapPolicy(block_classes()),
            use_orig_params=False,
            state_dict_type="full",
            **kwargs,
        )

    def _full_state_dict(self, rank0_only: bool = True):
        """Lightning's full-state-dict context, except that on CPU processes nothing is "offloaded to
        the CPU": FSDP's offload of a tensor already there frees the storage it still views
        (torch 2.13: "setStorage ... out of bounds for storage of size 0")."""
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with self._full_state_dict():
            return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        with self._full_state_dict():
            # Keyed by parameter name (Lightning re-keys it by index, which needs use_orig_params=True).
            return FSDP.optim_state_dict(self.model, optimizer)

    def _setup_model(self, model):
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning passes device_id=None on CPU, which FSDP reads as "find an accelerator"; CPU
        # processes (gloo) need the CPU device named.
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )


def is_sharded(trainer_cfg) -> bool:
    return trainer_cfg.get("strategy") == SHARDED


def check_sharding(cfg) -> None:
    """One-line errors for what trainer.strategy=fsdp cannot do."""
    if not is_sharded(cfg.trainer):
        if cfg.trainer.get("strategy") == "fsdp_cpu_offload":
            raise ConfigError("trainer.strategy=fsdp_cpu_offload is not supported by diffctl (its EMA update runs on the "
                              "device); use trainer.strategy=fsdp")
        return
    why = "trainer.strategy=fsdp"
    if cfg.get("compile", False) is True:
        raise ConfigError(f"compile=true is not supported with {why} (FSDP wraps the network's blocks, which torch.compile "
                          "of the whole network does not see); set compile=false or use trainer.strategy=ddp")
    if cfg.get("channels_last") is True:
        raise ConfigError(f"channels_last=true cannot be kept with {why}: FSDP stores each unit's weights as one flat "
                          "tensor, so they are always contiguous (NCHW); set channels_last=auto or false")
    if cfg.objective.get("teacher"):
        raise ConfigError(f"objective.teacher (consistency distillation) is not supported with {why}: the teacher "
                          "would be sharded but is called outside the module's forward; use trainer.strategy=ddp")


def check_resume(ckpt: dict[str, Any], trainer_cfg, path) -> None:
    """A checkpoint's optimizer state is keyed by parameter name under FSDP and by index otherwise.
    Either way the load fails with a traceback (FSDP cannot re-key index-keyed state of flat
    parameters; torch.optim pairs the names with parameters by position and meets a shape mismatch),
    so both are refused in one line before anything is built."""
    states = ckpt.get("optimizer_states") or [{}]
    state = states[0].get("state") or {} if isinstance(states[0], dict) else {}
    if not state:
        return
    by_name = isinstance(next(iter(state)), str)
    if by_name and not is_sharded(trainer_cfg):
        raise ConfigError(f"resume={path} was trained with trainer.strategy=fsdp, whose optimizer state only FSDP reads; "
                          "resume with trainer=fsdp or trainer.strategy=fsdp (`diffctl sample`/`export` read it either way)")
    if not by_name and is_sharded(trainer_cfg):
        raise ConfigError(f"resume={path} was trained without FSDP, whose optimizer state trainer.strategy=fsdp cannot "
                          "read; resume with the strategy it was trained with (`diffctl sample`/`export` read it either way)")


def sharded_trainer_kwargs(trainer_cfg) -> dict[str, Any]:
    """Trainer arguments replacing the strategy string with diffctl's FSDP strategy."""
    return {"strategy": ShardedStrategy()} if is_sharded(trainer_cfg) else {}


def strategy_is_sharded(trainer) -> bool:
    return isinstance(trainer.strategy, FSDPStrategy)


def clip_sharded_grad_norm(trainer, max_norm: float) -> None:
    """Clip the global gradient norm over all shards: FSDP's own clip_grad_norm_ on the root unit
    all-reduces the local squared norms (torch.nn.utils.clip_grad_norm_ would only see one shard)."""
    trainer.strategy.model.clip_grad_norm_(max_norm)
