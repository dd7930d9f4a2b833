"""What every objective shares: the base class and the draw of training times."""

from __future__ import annotations

from torch import Tensor

from diffctl.rng import BatchRandom
from diffctl.sde import SDE


def sample_times(sde: SDE, rng: BatchRandom, n: int) -> Tensor:
    """t ~ U[eps, T], stratified over the global batch (one draw per stratum) to lower variance."""
    return sde.eps + (sde.T - sde.eps) * rng.stratified_uniform(n)


class Objective:
    prediction = "eps"  # for an objective class outside diffctl; diffctl's own are in diffctl/prediction.py
    needs_target = False

    def __init__(self, sde: SDE):
        self.sde = sde
