"""Training objectives: a loss from a model, clean data x0 and sampled times.

Each objective names the network parameterization it trains when denoiser.prediction is null
(`prediction`; the run's own is diffctl.prediction.model_prediction) and whether it needs an EMA
target network (consistency models). Losses are per-sample means over pixels, averaged
over the batch.

One module per objective (a new objective is a new module here, its conf/objective/<name>.yaml, and
entries in diffctl/prediction.py and diffctl/schema/keys.py); the classes are importable from this
package, which is what the configs' `_target_: diffctl.objectives.<Class>` name.
"""

from __future__ import annotations

from diffctl.objectives.base import Objective, sample_times
from diffctl.objectives.consistency import TARGET_DECAY_RULES, ConsistencyObjective
from diffctl.objectives.denoising import DDPMObjective, NCSNObjective
from diffctl.objectives.edm import EDMObjective
from diffctl.objectives.flow import FlowObjective
from diffctl.objectives.progressive import ProgressiveObjective
from diffctl.objectives.reflow import ReflowObjective
from diffctl.objectives.regression import RegressionObjective

OBJECTIVES = {"ddpm": DDPMObjective, "ncsn": NCSNObjective, "flow": FlowObjective, "reflow": ReflowObjective, "edm": EDMObjective,
              "consistency": ConsistencyObjective, "regression": RegressionObjective, "progressive": ProgressiveObjective}

__all__ = ["OBJECTIVES", "Objective", "TARGET_DECAY_RULES", "DDPMObjective", "NCSNObjective", "FlowObjective", "ReflowObjective", "EDMObjective",
           "ConsistencyObjective", "RegressionObjective", "ProgressiveObjective", "sample_times"]
