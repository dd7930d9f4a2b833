"""Which parameterization a run's network has (what it outputs): one resolver that every reader uses.

`denoiser.prediction` chooses it, as part of the composed model; null takes the objective's own
(ddpm: eps, ncsn: score, flow: flow, edm: edm, consistency: consistency, regression: x0). The denoising
losses work in their own space through the model's conversions (DDPMObjective compares pred.eps with the
noise, NCSN uses pred.score, FlowObjective the velocity of (pred.x0, pred.eps), EDM pred.x0), so they
train any of eps, x0, v, score, flow and edm; consistency needs its own c_skip/c_out.
`objective.prediction` (ddpm) is where configs and checkpoints before denoiser.prediction named it;
it still counts, and must agree with denoiser.prediction when both are given. Torch-free: the
schema (diffctl/schema/keys.py) runs it before torch is imported.
"""

from __future__ import annotations

from diffctl.errors import ConfigError

DENOISING = ("eps", "x0", "v", "score", "flow", "edm")  # what the ddpm, ncsn, flow and edm losses train
# objective class (the `_target_` of conf/objective/*.yaml) -> (its name there, its own
# parameterization, the parameterizations its loss can train)
OBJECTIVE_PREDICTIONS = {
    "diffctl.objectives.DDPMObjective": ("ddpm", "eps", DENOISING),
    "diffctl.objectives.NCSNObjective": ("ncsn", "score", DENOISING),
    "diffctl.objectives.FlowObjective": ("flow", "flow", DENOISING),
    # the (k+1)-rectified flow takes its teacher's denoiser.prediction (diffctl.teacher)
    "diffctl.objectives.ReflowObjective": ("reflow", "flow", DENOISING),
    "diffctl.objectives.ConsistencyObjective": ("consistency", "consistency", ("consistency",)),
    "diffctl.objectives.RegressionObjective": ("regression", "x0", ("x0",)),  # its loss is in x0 at t = T
    "diffctl.objectives.EDMObjective": ("edm", "edm", DENOISING),
    # the student takes the teacher's denoiser.prediction (diffctl.teacher); v is the paper's choice
    "diffctl.objectives.ProgressiveObjective": ("progressive", "v", DENOISING),
}
PREDICTIONS = (*DENOISING, "consistency")  # every value denoiser.prediction may take (besides null)


def own_prediction(objective: str) -> str:
    """The parameterization an objective (by its conf/objective name) trains when denoiser.prediction is null."""
    return next(own for name, own, _ in OBJECTIVE_PREDICTIONS.values() if name == objective)


def _either(values) -> str:
    values = ["null", *values]
    return f"{', '.join(values[:-1])} or {values[-1]}"


def model_prediction(config, fallback: str = "eps") -> str:
    """The parameterization of the network a run config (plain dict or DictConfig, live or stored in a
    checkpoint) composes. ConfigError (one line) for a combination that cannot train. `fallback`: the
    own parameterization of an objective class that is not diffctl's (the user's; its `prediction`)."""
    objective = config.get("objective") or {}
    chosen = (config.get("denoiser") or {}).get("prediction")
    older = objective.get("prediction")  # ddpm's key before denoiser.prediction (old configs, checkpoints)
    name, own, trains = OBJECTIVE_PREDICTIONS.get(objective.get("_target_"), (None, fallback, None))
    if chosen is not None and older is not None and chosen != older:
        raise ConfigError(f"denoiser.prediction must be null or {older} when objective.prediction={older} (its older key) is given, got {chosen}")
    if chosen is not None and trains is not None and chosen not in trains:
        raise ConfigError(f"denoiser.prediction must be {_either(trains)} with objective={name}, got {chosen}")
    return chosen or older or own
