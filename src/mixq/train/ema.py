"""The model that is evaluated, selected and saved: the trained model or its moving average.

:func:`model_average` returns one object with the same interface either way, so the trainer
has no ``ema`` branches: ``update()`` after every optimizer step, ``model`` (what is
evaluated and checkpointed as ``model``), ``checkpoint()`` (what ``last.pt`` needs besides
``model`` to resume exactly), ``load(ckpt)``, and ``others()`` (further models whose test
accuracy is logged).

With ``optim.ema_decay = a > 0``: ``W_ema <- a * W_ema + (1 - a) * W`` after every step, for
parameters and batch-norm buffers (``torch.optim.swa_utils.AveragedModel``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class NoAverage:
    """``optim.ema_decay = 0``: the trained model is the model."""

    def __init__(self, model: nn.Module) -> None:
        self.trained = model

    @property
    def model(self) -> nn.Module:
        return self.trained

    def update(self) -> None:
        """Nothing to average."""

    def checkpoint(self) -> dict[str, Any]:
        return {}

    def load(self, ckpt: dict[str, Any]) -> None:
        self.trained.load_state_dict(ckpt["model"])

    def others(self) -> dict[str, nn.Module]:
        return {}


class MovingAverage(NoAverage):
    """An exponential moving average of ``model`` (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model)
        self.avg = AveragedModel(
            model,
            multi_avg_fn=get_ema_multi_avg_fn(decay),
            use_buffers=True,  # batch-norm running statistics are averaged too
        )

    @property
    def model(self) -> nn.Module:
        return self.avg.module

    def update(self) -> None:
        self.avg.update_parameters(self.trained)

    def checkpoint(self) -> dict[str, Any]:
        # to resume: the trained weights and the average's count
        return {
            "train_model": self.trained.state_dict(),
            "ema_n_averaged": int(self.avg.n_averaged),
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        self.trained.load_state_dict(ckpt["train_model"])
        self.avg.module.load_state_dict(ckpt["model"])
        self.avg.n_averaged.fill_(ckpt["ema_n_averaged"])

    def others(self) -> dict[str, nn.Module]:
        return {"trained": self.trained}  # logged as test_acc_trained, for comparison


def model_average(model: nn.Module, decay: float) -> NoAverage:
    """:class:`MovingAverage` of ``model`` when ``decay > 0``, else :class:`NoAverage`."""
    return MovingAverage(model, decay) if decay else NoAverage(model)
