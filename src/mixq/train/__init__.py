"""The ``mixq train`` application: configs and presets, model building, checkpoints, the loop.

Built on the library (:mod:`mixq.quant`, :mod:`mixq.convert`, :mod:`mixq.cost`,
:mod:`mixq.qat`, :mod:`mixq.data`, :mod:`mixq.models`); nothing in the library imports it.
"""

from mixq.train.config import TrainConfig
from mixq.train.trainer import Trainer, fit

__all__ = ["TrainConfig", "Trainer", "fit"]
