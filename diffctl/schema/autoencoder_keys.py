"""The schema of `diffctl train-autoencoder` (conf/train_autoencoder.yaml): train's shared keys with
their rules, the AutoencoderKL's keys, the loss and the report."""

from __future__ import annotations

import functools

from diffctl.schema.nodes import ByTarget
from diffctl.schema.rules import Bool, Choice, Float, Int, Seq, Text

AUTOENCODER = {
    "block_out_channels": Seq(Int(lo=1), what="a non-empty list of positive integers (one width per level)", min_len=1),
    "layers_per_block": Int(lo=1), "latent_channels": Int(lo=1), "norm_num_groups": Int(lo=1),
    "mid_block_add_attention": Bool(), "use_quant_conv": Bool(), "use_post_quant_conv": Bool(),
    "scaling_factor": Float(gt=0), "shift_factor": Float(null=True),
}  # fmt: skip


@functools.cache
def train_autoencoder_schema() -> dict:
    from diffctl.schema.keys import SEED, metrics_schema, train_schema

    train = train_schema()
    shared = ("seed", "resume", "progress_bar", "nan_policy", "compile", "channels_last", "optim", "ema",
              "checkpoint", "data", "trainer", "logger", "data_shape")  # the same keys as train's, the same rules
    return {
        **{key: train[key] for key in shared},
        "model": ByTarget({"diffctl.networks.autoencoder.AutoencoderKL": AUTOENCODER}),
        "loss": {
            "reconstruction": Choice("l1", "l2"), "kl_weight": Float(ge=0), "logvar_init": Float(),
            "lpips": Text(null=True), "lpips_resize": Int(lo=1, null=True), "perceptual_weight": Float(ge=0),
            "discriminator": {"enabled": Bool(), "start": Int(lo=0), "weight": Float(ge=0), "factor": Float(ge=0),
                              "loss": Choice("hinge", "vanilla"), "n_layers": Int(lo=1), "channels": Int(lo=1)},
        },
        "report": {"split": Choice("test", "train"), "num_images": Int(lo=1), "batch_size": Int(lo=1),
                   "prior_samples": Int(lo=0), "seed": SEED, "rfid": Bool()},
        "metrics": metrics_schema(),
        "kind": Choice("autoencoder"),  # written by train-autoencoder itself: what its checkpoints hold
    }  # fmt: skip
