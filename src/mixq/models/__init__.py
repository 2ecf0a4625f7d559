"""Model zoo: CIFAR ResNets, ImageNet ResNet-18 / MobileNetV2 and a tiny digits CNN.

Every activation is a distinct ``nn.ReLU`` / ``nn.ReLU6`` module so that model surgery can
replace each one with its own activation quantizer. Activations are not in-place, so
forward hooks see the true pre-activation inputs.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from .smallcnn import SmallCNN, smallcnn

__all__ = [
    "MODELS",
    "CifarResNet",
    "MobileNetV2",
    "ResNet",
    "SmallCNN",
    "count_conv_fc_params",
    "create_model",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet56",
    "smallcnn",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "smallcnn": smallcnn,
}


def create_model(name: str, num_classes: int | None = None, **kwargs: object) -> nn.Module:
    """Build a model from :data:`MODELS` by name.

    Args:
        name: Registered model name (e.g. ``"resnet20"``).
        num_classes: Number of output classes; the model's default when ``None``.
        **kwargs: Further keyword arguments for the model's factory function.

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: If ``name`` is not a registered model.
    """
    factory = MODELS.get(name)
    if factory is None:
        valid = ", ".join(sorted(MODELS))
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown model {name!r}; valid choices are: {valid}.{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(
                f"model {name!r} takes no argument(s) {unknown} (model.kwargs); its arguments: "
                f"{sorted(params)}"
            )
    return factory(**kwargs)


def count_conv_fc_params(model: nn.Module) -> int:
    """Count the weights and biases of every ``nn.Conv2d`` and ``nn.Linear`` in ``model``.

    BatchNorm parameters and buffers are not counted.

    Args:
        model: The network to inspect.

    Returns:
        The total number of conv and fully connected parameters.
    """
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            total += sum(p.numel() for p in (m.weight, m.bias) if p is not None)
    return total
