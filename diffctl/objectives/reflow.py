"""Reflow (Liu et al. 2023, "Flow straight and fast", Sec. 2.3): flow matching on a fixed coupling.

The (k+1)-rectified flow regresses the velocity of the straight path between the two ends of pairs
(Z0, Z1) that the k-rectified flow made: Z1 = ODE(Z0) from noise Z0 (diffctl.pairs, written by
`diffctl reflow`). The loss is FlowObjective's at x_t = alpha x1 + sigma z with the pair's z instead
of fresh noise, so the path's velocity target alpha' x1 + sigma' z is that of the pair (z - x1 on
sde=linear); t is drawn as flow matching draws it. The student is its teacher's model (model, SDE,
parameterization, conditioning from the teacher's checkpoint, diffctl.teacher) and starts from the
teacher's weights (`init_from_teacher`; Liu et al. fine-tune the 1-rectified flow). The teacher
itself is not used in training, so it is released once its weights are copied.
"""

from __future__ import annotations

from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.flow import FlowObjective
from diffctl.pairs import NOISE
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom
from diffctl.sde import SDE


class ReflowObjective(FlowObjective):
    """Flow matching on the coupling in `pairs` (a pairs.npz); `teacher` names the model that made them."""

    prediction = own_prediction("reflow")
    model_from_teacher = True  # the network, SDE and denoiser config are the teacher's (diffctl.teacher)
    keeps_teacher = False  # only its weights are needed: released after init (diffctl.train)
    uses_pairs = True  # the training set is objective.pairs (diffctl.pairs.attach_pairs)

    def __init__(self, sde: SDE, pairs: str | None = None, teacher: str | None = None, init_from_teacher: bool = True,
                 time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):  # fmt: skip
        super().__init__(sde, time_sampling, logit_mean, logit_std)
        self.pairs, self.teacher_path, self.init_from_teacher = pairs, teacher, bool(init_from_teacher)
        self.teacher: DiffusionModel | None = None  # loaded by diffctl.train (attach_teacher) for its weights

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, *, batch: dict | None = None, **_) -> Tensor:
        if batch is None or NOISE not in batch:
            raise RuntimeError("objective=reflow trains on (noise, sample) pairs: set objective.pairs to a pairs.npz of `diffctl reflow`")
        t = self.times(rng, x0.shape[0]).to(x0.dtype)
        return self.velocity_loss(model, x0, batch[NOISE].to(x0.dtype), t, cond)
