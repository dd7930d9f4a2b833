"""The names config keys choose from, declared where importing them costs nothing: the schema checks
a whole config with them before torch or Lightning is imported, so `diffctl train optim.lr=-1`
answers before the seconds those imports take (diffctl/cli.py; tests/test_cli_startup.py).

The modules that implement the choices import their names from here (data, detectors, metrics,
likelihood, export, module, performance). The samplers and their options are not here: each sampler
declares them where it is defined (diffctl/samplers/registry.py), and the CLI checks them only once
it imports torch anyway, or earlier when the command line sets a sampler key (diffctl/cli.py).
"""

from __future__ import annotations

from diffctl.schema.rules import Choice, Rule

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder")  # diffctl/data.py
SPLITS = ("train", "test")
DETECTORS = ("auto", "inception", "edm", "torchscript")  # diffctl/detectors.py
METRICS = ("fid", "kid", "is", "pr")  # diffctl/metrics.py
TRACES = ("exact", "hutchinson")  # diffctl/likelihood.py
PROBES = ("rademacher", "gaussian")
FORMATS = ("safetensors",)  # diffctl/export.py
NAN_POLICIES = ("stop", "skip")  # diffctl/module.py
# Sampling precision, named as Lightning names training precision (trainer.precision); the autocast
# dtype of each is in diffctl/performance.py.
SAMPLE_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")

class Registered(Rule):
    """One of the names a library registers (Lightning's accelerators, strategies). `known`, a few
    names it always registers, are allowed without importing it; any other value is checked against
    `load()` (all names, in the order the message lists them), which imports it."""

    def __init__(self, known: tuple, load, **kw):
        super().__init__(**kw)
        self.known, self.load, self._choice = tuple(known), load, None

    def full(self) -> Choice:
        if self._choice is None:
            self._choice = Choice(*self.load())
        return self._choice

    def describe(self) -> str:
        return self.full().describe()

    def bad(self, value):
        return None if isinstance(value, str) and value in self.known else self.full().bad(value)

    def wrong_type(self):
        return [1]

    def out_of_range(self):
        return ["not-a-choice"]
