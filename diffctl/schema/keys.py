"""The config schema of every command: each key's type, range and choices, in one place (the rules
are in diffctl/schema/rules.py, the names keys choose from in choices.py; the samplers' options are
declared by each sampler, diffctl/samplers/registry.py).
`validate(cfg, command)` is the first thing each command does; a key added to conf/ without an entry
here is refused (tests/test_bad_inputs_schema.py composes every config and checks this). It imports
neither torch nor Lightning for the usual configs (only Lightning's registries and Trainer, for a
trainer.* value or key outside those listed here), so the CLI runs it before importing them.

Unknown keys (`+key=value`) are refused with the close matches: a key nothing reads would otherwise be
ignored silently. The exceptions pass the key on to a class that checks it: extra trainer.* keys go to
Lightning's Trainer (`+trainer.profiler=simple`, named when Lightning refuses them, diffctl/build.py),
extra logger.* keys to the logger class, and a group whose `_target_` is the user's own class.
"""

from __future__ import annotations

import functools

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffctl.errors import ConfigError
from diffctl.prediction import PREDICTIONS, model_prediction
from diffctl.schema.choices import (
    DATASETS,
    DETECTORS,
    FORMATS,
    METRICS,
    NAN_POLICIES,
    PROBES,
    SAMPLE_PRECISIONS,
    SPLITS,
    TRACES,
)
from diffctl.schema.autoencoder_keys import train_autoencoder_schema
from diffctl.schema.lightning_keys import logger_schema, trainer_schema
from diffctl.schema.nodes import ByTarget, SamplerNode, check_node
from diffctl.schema.rules import (
    AnyOf,
    Bool,
    Choice,
    Float,
    Int,
    Numbers,
    Pattern,
    Seq,
    Text,
)

SEED = Int(lo=0, hi=2**32 - 1)  # numpy's and Lightning's seed range (Lightning replaces others by a random seed)
PATH = Text()
PATH_OR_NULL = Text(null=True)
DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", what="auto, cpu, cuda, cuda:N or mps")


def _check_sampler(data, key: str) -> None:
    from diffctl.samplers.registry import check_config_node  # imports the samplers, and torch

    check_config_node(data, key)


SAMPLER_NODE = SamplerNode(_check_sampler)  # sampler, sample_grid.sampler
COMMANDS = {"train": "train", "sample": "sample", "likelihood": "likelihood", "fid_stats": "fid-stats", "export": "export",
            "train_classifier": "train-classifier", "train_autoencoder": "train-autoencoder", "inpaint": "inpaint",
            "metrics_command": "metrics", "distill": "distill", "reflow": "reflow"}

# ---------------------------------------------------------------- groups

UNET = {
    "base_channels": Int(lo=1), "channel_mult": Seq(Int(lo=1), what="a non-empty list of positive integers", min_len=1),
    "num_res_blocks": Int(lo=1), "attn_resolutions": Seq(Int(lo=1), what="a list of positive integers (feature-map sizes)"),
    "dropout": Float(ge=0, lt=1), "num_heads": Int(lo=1), "out_channels": Int(lo=1, null=True),
    "resample_with_conv": Bool(), "gradient_checkpointing": Bool(),
}  # fmt: skip
DIT = {
    "patch_size": Int(lo=1), "hidden_size": Int(lo=1), "depth": Int(lo=1), "num_heads": Int(lo=1),
    "mlp_ratio": Float(gt=0), "out_channels": Int(lo=1, null=True), "size": Choice("S", "B", "L", "XL", null=True),
    "gradient_checkpointing": Bool(),
}  # fmt: skip
ARRAY = "nested lists of finite numbers"
GMM = {
    "shape": Seq(Int(lo=1), what="a list of positive integers ([D] or [C, H, W])", min_len=1, null=True),
    "num_components": Int(lo=1), "means": Numbers(what=f"a K x D list ({ARRAY})", null=True),
    "mean_scale": Float(ge=0), "scales": Numbers(what=f"a number > 0, K numbers or a K x D list ({ARRAY} > 0)", gt=0, scalar=True),
    "covariances": Numbers(what=f"a K x D x D list ({ARRAY})", null=True),
    "weights": Numbers(what=f"K numbers >= 0 ({ARRAY})", ge=0, null=True),
    "seed": SEED, "conditional": Bool(), "file": PATH_OR_NULL,
}  # fmt: skip
MODEL = {"diffctl.networks.UNet": UNET, "diffctl.networks.unet.UNet": UNET, "diffctl.networks.DiT": DIT,
         "diffctl.networks.dit.DiT": DIT, "diffctl.networks.gmm.GaussianMixture": GMM}  # fmt: skip

_TIMES = {"eps": Float(gt=0, lt=1), "sample_eps": Float(gt=0, lt=1, null=True)}
VP = {"beta_min": Float(ge=0), "beta_max": Float(gt=0), **_TIMES}
VE = {"sigma_min": Float(gt=0), "sigma_max": Float(gt=0), **_TIMES}
LINEAR = {"t_max": Float(gt=0, lt=1), **_TIMES}
SDE = {"diffctl.sde.VPSDE": VP, "diffctl.sde.SubVPSDE": VP, "diffctl.sde.VESDE": VE, "diffctl.sde.LinearSDE": LINEAR}

OBJECTIVE = {
    "diffctl.objectives.DDPMObjective": {"weighting": Choice("simple", "likelihood", "min_snr"),
                                         "prediction": Choice("eps", "x0", "v", null=True), "snr_gamma": Float(gt=0, null=True)},
    "diffctl.objectives.NCSNObjective": {},
    "diffctl.objectives.FlowObjective": {"time_sampling": Choice("uniform", "logit_normal"), "logit_mean": Float(), "logit_std": Float(gt=0)},
    "diffctl.objectives.ReflowObjective": {"pairs": PATH_OR_NULL, "teacher": PATH_OR_NULL, "init_from_teacher": Bool(),
                                           "time_sampling": Choice("uniform", "logit_normal"), "logit_mean": Float(), "logit_std": Float(gt=0)},
    "diffctl.objectives.RegressionObjective": {},
    "diffctl.objectives.EDMObjective": {"p_mean": Float(), "p_std": Float(gt=0), "sigma_data": Float(gt=0)},
    "diffctl.objectives.ProgressiveObjective": {"teacher": PATH_OR_NULL, "student_steps": Int(lo=1),
                                                "weighting": Choice("truncated_snr", "snr"), "clip_teacher": Bool(null=True)},
    "diffctl.objectives.ConsistencyObjective": {
        "num_scales_start": Int(lo=2), "num_scales_end": Int(lo=2), "target_decay_start": Float(ge=0, lt=1),
        "target_decay_rule": Choice("paper", "code"), "rho": Float(gt=0), "metric": Choice("l2", "l1", "pseudo_huber"),
        "total_steps": Int(lo=1), "teacher": PATH_OR_NULL, "init_from_teacher": Bool(),
    },
}  # fmt: skip


@functools.cache  # built once per process
def _data():
    return {
        "_target_": Text(what="a class path"), "name": Choice(*DATASETS), "root": PATH_OR_NULL, "resolution": Int(lo=1),
        "channels": Choice(1, 3, hint="1 = grayscale, 3 = RGB"), "random_flip": Bool(), "download": Bool(),
        "batch_size": Int(lo=1), "num_workers": Int(lo=0), "limit": Int(lo=1, null=True), "ve_sigma_max": Float(gt=0),
    }  # fmt: skip


@functools.cache
def metrics_schema():
    return {
        "names": Seq(Choice(*METRICS), what=f"a list of distinct names from {', '.join(METRICS)} (or [])", unique=True),
        "detector": Choice(*DETECTORS), "inception_weights": PATH_OR_NULL, "detector_path": PATH_OR_NULL,
        "download": Bool(), "cache_dir": PATH, "ref": Text(what="<dataset>:<split>, a folder of images or an .npz file", null=True),
        "ref_root": PATH_OR_NULL,
        "ref_limit": AnyOf(Choice("auto"), Int(lo=1), what="auto, null (all reference images) or a positive integer", null=True),
        "quick_ref_limit": Int(lo=1), "fid_min_samples": Int(lo=0), "batch_size": Int(lo=1), "kid_subsets": Int(lo=1),
        "forward_batch": AnyOf(Choice("auto"), Int(lo=1), what="auto or a positive integer"),
        "kid_subset_size": Int(lo=2), "is_splits": Int(lo=1), "pr_neighbours": Int(lo=1), "seed": SEED, "progress_bar": Bool(),
    }  # fmt: skip


# ---------------------------------------------------------------- commands

COMMON = {"ckpt": Text(what="a checkpoint file or run directory", null=True), "use_ema": Bool(), "progress_bar": Bool()}


@functools.cache
def train_schema() -> dict:
    return {
        "seed": SEED, "conditional": Bool(), "label_dropout": Float(ge=0, lt=1, hint="1 would drop every label"),
        "resume": Text(what="a run directory or .ckpt file", null=True), "progress_bar": Bool(),
        "nan_policy": Choice(*NAN_POLICIES, sep=" | "), "compile": Bool(), "memory_check": Bool(),
        "channels_last": Choice(True, False, "auto", what="true, false or auto"),
        "optimized_metric": Choice("train/loss", null=True),
        "denoiser": {"sigma_data": Float(gt=0), "scale_input": Bool(), "prediction": Choice(*PREDICTIONS, null=True)},
        "optim": {"name": Choice("adam", "adamw"), "lr": Float(gt=0),
                  "betas": Seq(Float(ge=0, lt=1), what="a list of two numbers in [0, 1)", length=2),
                  "eps": Float(gt=0), "weight_decay": Float(ge=0), "warmup_steps": Int(lo=0),
                  "foreach": Bool(null=True), "fused": Bool(null=True)},
        "ema": {"decay": Float(ge=0, lt=1, hint="1 would never update the average"), "warmup": Bool()},
        "checkpoint": {"every_n_steps": Int(lo=1)},
        "sample_grid": {"every_n_steps": Int(lo=0), "num": Int(lo=1), "sampler": SAMPLER_NODE, "steps": Int(lo=1),
                        "consistency_steps": Int(lo=1), "seed": SEED},
        "model": ByTarget(MODEL), "sde": ByTarget(SDE), "objective": ByTarget(OBJECTIVE), "data": _data(),
        "condition": {"name": Choice("none", "class", "sr", "colorize", "inpaint"), "_target_": Text(what="a class path"),
                      "factor": Int(lo=2), "filter": Choice("bicubic", "area"),
                      "dropout": Float(ge=0, lt=1, hint="1 would never show the source")},
        "trainer": trainer_schema(), "logger": logger_schema(),
        "first_stage": Text(what="a `diffctl train-autoencoder` run or a diffusers AutoencoderKL folder", null=True),
        "latent": {"scale": Float(gt=0, null=True), "shift": Float(null=True), "cache_dir": PATH, "batch_size": Int(lo=1),
                   "weights": Text(what="the first stage's sha256 (written by train)", null=True)},
        # written by train itself (the shape the network models: the data's, or its latents'); a second train() of one config sees it
        "data_shape": {"channels": Int(lo=1), "resolution": Int(lo=1), "num_classes": Int(lo=0)},
    }  # fmt: skip


CLASSIFIER = {k: v for k, v in UNET.items() if k != "out_channels"} | {"pool": Choice("adaptive", "attention")}


@functools.cache
def train_classifier_schema() -> dict:
    train = train_schema()
    shared = ("seed", "resume", "progress_bar", "nan_policy", "compile", "channels_last", "optim", "ema",
              "checkpoint", "sde", "data", "trainer", "logger", "data_shape")  # the same keys as train's, the same rules
    return {
        **{key: train[key] for key in shared},
        "denoiser": {k: v for k, v in train["denoiser"].items() if k != "prediction"},  # a classifier predicts no x0
        "model": ByTarget({"diffctl.networks.classifier.EncoderClassifier": CLASSIFIER}),
        "report": {"bins": Int(lo=1), "bin_by": Choice("t", "logsnr"), "batch_size": Int(lo=1),
                   "limit": Int(lo=1, null=True), "seed": SEED},
        "kind": Choice("classifier"),  # written by train-classifier itself: what its checkpoints hold
    }  # fmt: skip


@functools.cache
def sample_schema() -> dict:
    return {
        **COMMON, "steps": Int(lo=1), "num_samples": Int(lo=1), "batch_size": Int(lo=1), "seed": SEED,
        "noise": Choice(1, 2, what="1 (per-sample generators, before issue 15) or 2 (counter-based)"),
        "class_label": Int(lo=0, null=True), "guidance": Float(ge=0, hint="1 = no guidance"), "clip_denoised": Bool(null=True),
        "classifier": Text(what="a `diffctl train-classifier` checkpoint or run directory, or exact (model=gmm)", null=True),
        "classifier_scale": Float(ge=0, hint="1 = the classifier's own p(y | x_t)"),
        "precision": Choice(*SAMPLE_PRECISIONS, sep=" | ", as_text=True), "compile": Bool(), "memory_check": Bool(),
        "channels_last": Choice(True, False, "auto", what="true, false or auto"),
        "resume": Text(what="a `diffctl sample` run directory", null=True),
        "source": Text(what="<dataset>:<split>, a folder of images or an .npz", null=True), "source_root": PATH_OR_NULL,
        "lpips": PATH_OR_NULL, "lpips_resize": Int(lo=1, null=True),
        "trainer": {"accelerator": Choice("auto", "cpu", "gpu", "cuda", "mps"), "devices": Int(lo=1, hint="processes to sample with")},
        "sampler": SAMPLER_NODE, "metrics": metrics_schema(), "model": ByTarget(MODEL, null=True), "sde": ByTarget(SDE, null=True),
    }  # fmt: skip


@functools.cache
def likelihood_schema() -> dict:
    tolerance = "dopri5's tolerance, e.g. 1e-5"
    return {
        **COMMON, "split": Choice(*SPLITS), "data_root": PATH_OR_NULL,
        "num_batches": Int(lo=1, null=True, what="an integer >= 1 or null (the whole split)"),
        "batch_size": Int(lo=1, what="an integer >= 1"), "trace": Choice(*TRACES), "probe": Choice(*PROBES),
        "rtol": Float(gt=0, hint=tolerance), "atol": Float(gt=0, hint=tolerance), "seed": SEED, "dequantize": Bool(),
        "device": DEVICE, "model": ByTarget(MODEL, null=True), "sde": ByTarget(SDE, null=True), "memory_check": Bool(),
    }  # fmt: skip


@functools.cache
def fid_stats_schema() -> dict:
    return {"split": Choice(*SPLITS), "device": DEVICE, "data": _data(), "metrics": metrics_schema(), "memory_check": Bool()}


@functools.cache
def export_schema() -> dict:
    return {"ckpt": COMMON["ckpt"], "use_ema": Bool(), "format": Choice(*FORMATS), "out": PATH_OR_NULL}


@functools.cache
def inpaint_schema() -> dict:
    sample = sample_schema()
    return {
        **COMMON, "images": Text(what="<dataset>:<split>, a folder of images or an .npz"), "images_root": PATH_OR_NULL,
        "limit": Int(lo=1, null=True), "mask": Text(what="center, box:x0,y0,x1,y1, random, a mask PNG or a folder of them"),
        "method": Choice("repaint", "replace"), "steps": Int(lo=1), "jump_length": Int(lo=1), "resample": Int(lo=1),
        "spacing": Choice("uniform", "quadratic", "trailing", "leading", "karras", "logsnr"),
        **{key: sample[key] for key in ("batch_size", "seed", "noise", "class_label", "clip_denoised", "precision",
                                        "compile", "memory_check", "trainer")},
        "resume": Text(what="a `diffctl inpaint` run directory", null=True),
        "lpips": PATH_OR_NULL, "lpips_resize": Int(lo=1, null=True),
    }  # fmt: skip


@functools.cache
def metrics_command_schema() -> dict:
    images = "a folder of images, an .npz, a `diffctl sample`/`inpaint` run directory or <dataset>:<split>"
    return {**metrics_schema(), "images": Text(what=images, null=True), "images_root": PATH_OR_NULL, "limit": Int(lo=1, null=True),
            "trainer": sample_schema()["trainer"]}  # null images or ref: refused by the command, saying what to give


@functools.cache
def distill_schema() -> dict:
    return {"ckpt": COMMON["ckpt"], "teacher_steps": Int(lo=2), "rounds": Int(lo=1), "steps_per_round": Int(lo=1),
            "train_overrides": Seq(Text(what="a key=value override"), what="a list of `diffctl train` overrides (key=value strings)"),
            "resume": Text(what="a `diffctl distill` run directory", null=True)}  # fmt: skip


@functools.cache
def reflow_schema() -> dict:
    sample = sample_schema()
    overrides = lambda what: Seq(Text(what="a key=value override"), what=f"a list of `diffctl {what}` overrides (key=value strings)")  # noqa: E731
    return {**COMMON, "num_pairs": Int(lo=1), "steps": Int(lo=1), "batch_size": Int(lo=1), "seed": SEED, "noise": sample["noise"],
            "clip_denoised": Bool(null=True), "precision": sample["precision"], "trainer": sample["trainer"], "sampler": SAMPLER_NODE,
            "train_steps": Int(lo=1), "init_from_teacher": Bool(), "train_overrides": overrides("train"),
            "eval": {"steps": Seq(Int(lo=1), what="a non-empty list of step counts (integers >= 1)", min_len=1, unique=True),
                     "num_samples": Int(lo=1), "seed": SEED, "straightness_steps": Int(lo=1), "straightness_samples": Int(lo=1),
                     "sample_overrides": overrides("sample")},
            "resume": Text(what="a `diffctl reflow` run directory", null=True)}  # fmt: skip


SCHEMAS = {"train": train_schema, "distill": distill_schema, "reflow": reflow_schema, "sample": sample_schema, "likelihood": likelihood_schema,
           "fid_stats": fid_stats_schema, "export": export_schema, "train_classifier": train_classifier_schema,
           "inpaint": inpaint_schema, "metrics_command": metrics_command_schema,
           "train_autoencoder": train_autoencoder_schema}  # fmt: skip


def plain(cfg) -> dict:
    """The config as plain data with interpolations resolved; `???` stays as the mark of a missing value."""
    if not OmegaConf.is_config(cfg):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def combinations(data: dict, command: str) -> None:
    """Rules between keys that PyTorch would otherwise raise about once training started."""
    optim = data.get("optim") or {}
    if command in ("train", "train_classifier", "train_autoencoder") and optim.get("fused") is True and optim.get("foreach") is True:
        raise ConfigError("optim.fused and optim.foreach must not both be true (PyTorch's Adam runs one kernel or the other), got true and true")
    if command == "train":
        model_prediction(data)  # denoiser.prediction against objective (and its older objective.prediction)


def validate(cfg: DictConfig | dict, command: str, where: str | None = None, samplers: bool = True) -> None:
    """Check a command's config (`command` as in conf/: train, sample, likelihood, fid_stats, export, ...)
    against its schema; ConfigError naming the first bad key. `where`: appended to the message (a
    config that came from a file, e.g. the checkpoint a resumed run takes its model from).
    samplers=False: all but the sampler nodes, whose check imports torch (the CLI's first check)."""
    data = plain(cfg)
    try:
        check_node(data, SCHEMAS[command](), "", COMMANDS[command], samplers)
        combinations(data, command)
    except ConfigError as err:
        if where is None:
            raise
        raise ConfigError(f"{err} ({where})") from None


def validate_group(cfg, command: str, group: str) -> None:
    """Check one top-level node (e.g. metrics) of a command's config, named as `group.<key>`."""
    check_node(plain(cfg), SCHEMAS[command]()[group], group, COMMANDS[command])
