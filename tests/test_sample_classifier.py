"""`diffctl sample classifier=... classifier_scale=s`: classifier guidance wired into sampling.

Against the exact answer: an unconditional Gaussian mixture guided by its exact posterior p(k | x_t)
at s = 1 samples component k exactly (p_t(x) p_t(k | x) = w_k p_t(x | k) at every level), so the
samples labelled k must have component k's mean and std. With a trained classifier: the wiring
(labels, calls counted, s = 0 is the unguided run bitwise, resume records the classifier) and the
one-line errors.
"""

import json

import numpy as np
import pytest
from helpers import TINY_RUN, compose_train, run_cli, run_sample

from diffctl.errors import CheckpointError, ConfigError

NO_METRICS = ["metrics.names=[]"]
MEANS, SCALES = [[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]], [0.3, 0.6, 0.45]
GMM = ["model=gmm", f"model.means={MEANS}".replace(" ", ""), f"model.scales={SCALES}".replace(" ", ""),
       "model.weights=[0.6,0.3,0.1]"]  # fmt: skip


def _samples(run):
    with np.load(run / "samples.npz") as data:
        return data["samples"], data.get("labels")


@pytest.mark.parametrize("sde", ["vp", "ve"])
def test_exact_classifier_samples_each_component_exactly(tmp_path, sde):
    """Balanced labels (sample i gets class i mod 3): the samples of label k follow N(mu_k, s_k^2 I),
    although the mixture weights are 0.6/0.3/0.1 and the model is unconditional."""
    result = run_sample(tmp_path, [*GMM, f"sde={sde}", "classifier=exact", "sampler=ode", "steps=40",
                                   "num_samples=1200", "batch_size=600"])  # fmt: skip
    x, labels = _samples(tmp_path)
    assert labels is not None and np.array_equal(labels, np.arange(1200) % 3)
    for k in range(3):
        xk = x[labels == k]
        se = SCALES[k] / np.sqrt(len(xk))  # standard error of each mean coordinate
        assert np.abs(xk.mean(0) - MEANS[k]).max() < 5 * se + 0.02, (k, xk.mean(0))
        assert np.abs(xk.std(0) - SCALES[k]).max() < 0.1 * SCALES[k], (k, xk.std(0))
    # every network (mixture) call was guided: one classifier call each
    assert result["classifier"] == "exact" and result["classifier_scale"] == 1.0
    assert result["classifier_calls_per_sample"] == result["nfe_per_sample"] > 0


def test_one_class_label_and_scale_zero_is_unguided(tmp_path):
    one = run_sample(tmp_path / "one", [*GMM, "classifier=exact", "class_label=2", "sampler=ddim", "steps=30", "num_samples=300"])
    x, labels = _samples(tmp_path / "one")
    assert (labels == 2).all() and np.abs(x.mean(0) - MEANS[2]).max() < 0.1
    assert one["classifier_calls_per_sample"] == 30
    run_sample(tmp_path / "plain", [*GMM, "sampler=ddim", "steps=30", "num_samples=300"])
    run_sample(tmp_path / "zero", [*GMM, "classifier=exact", "classifier_scale=0", "class_label=2", "sampler=ddim",
                                   "steps=30", "num_samples=300"])  # fmt: skip
    zero = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert np.array_equal(_samples(tmp_path / "zero")[0], _samples(tmp_path / "plain")[0])
    assert zero["classifier_calls_per_sample"] == 0 and zero["nfe_per_sample"] == 30


def test_classifier_on_top_of_classifier_free_guidance(tmp_path):
    """A conditional mixture with CFG weight w and its exact classifier at s: the exact gradient is
    grad log p_t(k | x) = score_t(x | k) - score_t(x), so the guided score
    (1 - w) score(x) + w score(x | k) + s [score(x | k) - score(x)] is CFG with weight w + s: the same
    samples as guidance=w+s alone, up to rounding. The doubled CFG batch is one network call and the
    classifier is called once per step on top."""
    common = [*GMM, "model.conditional=true", "class_label=0", "sampler=ddim", "steps=20", "num_samples=200"]
    result = run_sample(tmp_path / "both", [*common, "guidance=2", "classifier=exact", "classifier_scale=1.5"])
    run_sample(tmp_path / "cfg", [*common, "guidance=3.5"])
    both, cfg = _samples(tmp_path / "both")[0], _samples(tmp_path / "cfg")[0]
    assert np.abs(both - cfg).max() < 1e-3
    assert result["nfe_per_sample"] == 20 and result["classifier_calls_per_sample"] == 20
    run_sample(tmp_path / "w2", [*common, "guidance=2"])
    assert np.abs(_samples(tmp_path / "w2")[0] - cfg).max() > 0.05  # the classifier's part is not negligible


# --- a trained classifier --------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    from diffctl.train_classifier import train_classifier

    run = tmp_path_factory.mktemp("clf") / "run"
    run.mkdir(parents=True)
    overrides = [*(o for o in TINY_RUN if not o.startswith("sample_grid.")), "model.base_channels=8", "report.bins=2",
                 "report.limit=16"]  # fmt: skip
    train_classifier(compose_train(run, overrides, config_name="train_classifier"))
    return run


def test_trained_classifier_guides_an_unconditional_checkpoint(tmp_path, trained, classifier_run):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", "sampler=ddim", "steps=3", "num_samples=4", "batch_size=2", *NO_METRICS]
    guided = run_sample(tmp_path / "g", [*common, f"classifier={classifier_run}", "class_label=3", "classifier_scale=1000"])
    x, labels = _samples(tmp_path / "g")
    assert x.shape == (4, 8, 8, 1) and x.dtype == np.uint8 and (labels == 3).all()
    assert guided["classifier"] == str((classifier_run / "checkpoints" / "last.ckpt").resolve())
    assert guided["classifier_calls_per_sample"] == 3 and guided["nfe_per_sample"] == 3
    run_sample(tmp_path / "p", common)
    run_sample(tmp_path / "z", [*common, f"classifier={classifier_run}", "classifier_scale=0"])
    plain, zero = _samples(tmp_path / "p")[0], _samples(tmp_path / "z")[0]
    assert np.array_equal(zero, plain) and not np.array_equal(x, plain)  # s = 0: the unguided run; s = 1000 moves it
    # the balanced labels of an unconditional model come from the classifier's 10 classes
    assert np.array_equal(_samples(tmp_path / "z")[1], np.arange(4) % 10)


def test_resume_refuses_a_changed_classifier(tmp_path, classifier_run):
    from diffctl.resume import manifest

    ckpt = tmp_path / "clf.ckpt"
    ckpt.write_bytes((classifier_run / "checkpoints" / "last.ckpt").read_bytes())
    manifest(tmp_path, None, False, 2, str(ckpt))
    recorded = json.loads((tmp_path / "partial" / "manifest.json").read_text())
    assert recorded["classifier"] == str(ckpt) and len(recorded["classifier_sha256"]) == 64
    manifest(tmp_path, None, True, 2)  # unchanged: accepted
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="changed since the run started"):
        manifest(tmp_path, None, True, 2)


@pytest.mark.parametrize("overrides, message", [
    (["classifier_scale=2"], "classifier_scale applies to classifier guidance only"),
    (["classifier=exact"], "classifier=exact is the exact posterior of model=gmm"),
    (["classifier=exact", "classifier_scale=-1"], "classifier_scale"),
    (["class_label=3"], "is unconditional"),
])  # fmt: skip
def test_bad_classifier_options_on_a_checkpoint(tmp_path, trained, overrides, message):
    _, run_dir = trained
    with pytest.raises(ConfigError, match=message):
        run_sample(tmp_path, [f"ckpt={run_dir}", "steps=2", "num_samples=2", *NO_METRICS, *overrides])


def test_bad_classifier_files_and_shapes(tmp_path, trained, classifier_run):
    _, run_dir = trained
    with pytest.raises(CheckpointError, match="not a classifier"):  # a diffusion checkpoint as the classifier
        run_sample(tmp_path / "a", [f"ckpt={run_dir}", f"classifier={run_dir}", "steps=2", "num_samples=2", *NO_METRICS])
    with pytest.raises(ConfigError, match="use classifier=exact"):
        run_sample(tmp_path / "b", [*GMM, f"classifier={classifier_run}", "steps=2", "num_samples=2"])
    with pytest.raises(ConfigError, match=r"class_label must be in \[0, 2\]"):
        run_sample(tmp_path / "c", [*GMM, "classifier=exact", "class_label=3", "steps=2", "num_samples=2"])


def test_cli_error_is_one_line(tmp_path, trained):
    _, run_dir = trained
    proc = run_cli(["sample", f"ckpt={run_dir}", "classifier=exact", "steps=2", "num_samples=2", "metrics.names=[]"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "classifier=exact is the exact posterior of model=gmm" in proc.stderr + proc.stdout


def test_memory_estimate_counts_the_classifier(tmp_path, trained, classifier_run, monkeypatch):
    """Guidance runs the classifier forward and back to x at every call: its activations are part of
    the sampling estimate, and more than its inference forward alone (the backward keeps them)."""
    import torch

    import diffctl.memory as memory
    from diffctl.config import compose_config
    from diffctl.memory_estimates import network_bytes
    from diffctl.source import load_source

    _, run_dir = trained
    seen = {}
    monkeypatch.setattr(memory, "_split", lambda parts, *rest: seen.update(parts))
    cfg = compose_config("sample", [f"ckpt={run_dir}", f"classifier={classifier_run}", "batch_size=8"], tmp_path)
    source = load_source(cfg, str(run_dir))
    memory.check_sample(cfg, source, torch.device("cpu"))
    class Forward(torch.nn.Module):  # the classifier's network with network_bytes' (x, t, labels) call
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, _labels):
            return self.net(x, t)

    inference = network_bytes(Forward(source.classifier.net), 8, (1, 8, 8), 0, None)
    assert seen["classifier activations"] > 0 and inference is not None
    assert seen["classifier activations"] > inference


@pytest.mark.parametrize("classifier_overrides, message", [
    (["sde=ve"], "the classifier was made for"),  # trained under another SDE
    (["data.resolution=16"], r"was trained on 1x16x16 images, the model makes 1x8x8"),
])  # fmt: skip
def test_classifier_of_another_sde_or_size_is_refused(tmp_path, trained, classifier_overrides, message):
    from diffctl.train_classifier import train_classifier

    run = tmp_path / "clf"
    run.mkdir()
    overrides = [*(o for o in TINY_RUN if not o.startswith("sample_grid.")), "model.base_channels=8", "report.bins=1",
                 "report.limit=4", "trainer.max_steps=1", *classifier_overrides]  # fmt: skip
    train_classifier(compose_train(run, overrides, config_name="train_classifier"))
    _, run_dir = trained
    with pytest.raises(ConfigError, match=message):
        run_sample(tmp_path / "s", [f"ckpt={run_dir}", f"classifier={run}", "steps=2", "num_samples=2", *NO_METRICS])
    assert not (tmp_path / "s" / "samples.npz").exists()
