"""The names config keys choose from, declared where importing them costs nothing: the schema checks
a whole config with them before torch or Lightning is imported, so `diffctl train optim.lr=-1`
answers before the seconds those imports take (diffctl/cli.py; tests/test_cli_startup.py).

The modules that implement the choices import their names from here (data, detectors, metrics,
likelihood, export, module, performance). The samplers' options are their function signatures and
their predictors and correctors dispatch tables; tests/test_cli_startup.py checks that those equal
the names below, so a sampler option added there without its entry here fails the tests.
"""

from __future__ import annotations

from diffctl.schema.nodes import SamplerNode
from diffctl.schema.rules import Bool, Choice, Float, Int, Rule

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder")  # diffctl/data.py
SPLITS = ("train", "test")
DETECTORS = ("auto", "inception", "edm", "torchscript")  # diffctl/detectors.py
METRICS = ("fid", "kid", "is")  # diffctl/metrics.py
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


# ---------------------------------------------------------------- samplers (diffctl/samplers)

# Each sampler's options: the parameters of its function after (denoiser, x, steps, labels, generators).
SAMPLER_OPTIONS = {
    "ddpm": ("variance", "spacing"),
    "ddim": ("eta", "spacing"),
    "pc": ("predictor", "corrector", "snr", "corrector_steps", "variance", "spacing"),
    "ode": ("solver", "spacing", "rtol", "atol", "lower_order_final", "sigma_min", "sigma_max"),
    "consistency": ("spacing",),
}
SPACINGS = ("uniform", "quadratic", "trailing", "leading", "karras", "logsnr")  # samplers/common.py
SOLVERS = ("euler", "heun", "rk4", "dpmpp_2m", "adaptive")  # samplers/ode.py
PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")  # samplers/stochastic.py
CORRECTORS = ("langevin", "ald", "none")
VARIANCES = ("small", "large")

# Every sampler option's type and range, declared once: check_sampler and the config schema
# (diffctl/schema/keys.py: sampler.*, sample_grid.sampler.*) both read them. (sampler, option) entries
# override the option's rule for one sampler.
OPTION_RULES: dict = {
    "spacing": Choice(*SPACINGS),
    "solver": Choice(*SOLVERS),
    "predictor": Choice(*PREDICTORS),
    "corrector": Choice(*CORRECTORS),
    "variance": Choice(*VARIANCES),
    "eta": Float(ge=0, le=1, hint="0 = deterministic DDIM, 1 = DDPM"),
    "snr": Float(gt=0),
    "rtol": Float(gt=0),
    "atol": Float(gt=0),
    "lower_order_final": Bool(),
    "sigma_min": Float(gt=0, null=True, hint="s = sigma/alpha; null = the SDE's own end"),
    "sigma_max": Float(gt=0, null=True, hint="s = sigma/alpha; null = the SDE's own end"),
    "corrector_steps": Int(lo=0),
    ("ode", "spacing"): Choice(*SPACINGS, "auto"),
}


def option_rules(name: str) -> dict:
    """The rule of each option sampler `name` accepts (KeyError: an option without a declared rule)."""
    return {key: OPTION_RULES.get((name, key)) or OPTION_RULES[key] for key in SAMPLER_OPTIONS[name]}


SAMPLER_NODE = SamplerNode(tuple(SAMPLER_OPTIONS), option_rules)
