"""The schema of the trainer and logger groups: Lightning's Trainer and logger classes. The values
conf/ uses are known without importing Lightning; other values and extra keys are looked up in, or
passed on to, Lightning (diffctl/schema/keys.py says why)."""

from __future__ import annotations

import functools

from diffctl.schema.choices import Registered
from diffctl.schema.nodes import ByTarget, Passthrough
from diffctl.schema.rules import AnyOf, Bool, Choice, Float, Int, Pattern, Seq, Text


def _accelerators() -> tuple:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


def _strategies() -> tuple:
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def _lightning_trainer():
    import lightning.pytorch as pl

    return pl.Trainer


@functools.cache
def trainer_schema():
    precisions = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true", "64-true", "64",
                  "transformer-engine", "transformer-engine-float16")  # fmt: skip
    devices = AnyOf(Int(lo=1), Choice(-1, "auto"), Seq(Int(lo=0), what="", min_len=1), Pattern(r"-1|\d+(,\d+)*,?", what=""),
                    what="a positive integer, -1 (all), auto, a list of device indices or a string like 0,1")  # fmt: skip
    keys = {
        "_target_": Text(what="a class path"),
        # the values conf/trainer/ uses are known without importing Lightning; others are looked up in its registry
        "accelerator": Registered(("auto", "gpu", "cpu", "cuda", "mps"), _accelerators),
        "devices": devices, "num_nodes": Int(lo=1),
        "strategy": Registered(("auto", "ddp", "ddp_spawn", "fsdp"), _strategies),
        "precision": Choice(*precisions, as_text=True), "max_steps": Int(lo=1), "max_epochs": Int(lo=-1, null=True),
        "accumulate_grad_batches": Int(lo=1), "gradient_clip_val": Float(ge=0, null=True), "log_every_n_steps": Int(lo=1),
        "limit_val_batches": AnyOf(Int(lo=0), Float(ge=0, le=1), what="an integer >= 0 (batches) or a fraction in [0, 1]"),
        "num_sanity_val_steps": Int(lo=-1), "deterministic": AnyOf(Bool(), Choice("warn"), what="true, false or warn", null=True),
        "benchmark": Bool(null=True), "enable_model_summary": Bool(), "use_distributed_sampler": Bool(),
    }  # fmt: skip
    return Passthrough(keys, _lightning_trainer)


@functools.cache
def logger_schema():
    def logger(cls_name, keys):
        def cls():
            import lightning.pytorch.loggers as loggers

            return getattr(loggers, cls_name)

        return Passthrough({"_target_": Text(what="a class path"), **keys}, cls)

    files = {"save_dir": Text(), "name": Text(what="a name"), "version": AnyOf(Text(what="", empty=True), Int(lo=0), what="a name or a number")}
    wandb = {"project": Text(what="a name"), "name": Text(what="a name", null=True), "save_dir": Text(), "offline": Bool(),
             "log_model": AnyOf(Bool(), Choice("all"), what="true, false or all")}  # fmt: skip
    return ByTarget({f"lightning.pytorch.loggers.{n}": logger(n, k) for n, k in
                     (("CSVLogger", files), ("TensorBoardLogger", files), ("WandbLogger", wandb))}, null=True)  # fmt: skip
