"""Errors and warnings of the exporters."""

from __future__ import annotations


class ExportError(ValueError):
    """A model that cannot be exported as asked (unconverted, unsupported op, bad option)."""


class PackedFormatError(ValueError):
    """A ``mixq-packed`` file that cannot be read: wrong format, corrupt, truncated."""


class ExportWarning(UserWarning):
    """Something an exported file does differently from what the report says (e.g. a tensor
    stored with more bits than its quantizer's bitwidth because its codes need them)."""


def require_onnx():
    """Import and return ``onnx``, or raise an ``ImportError`` naming the extra to install."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'mixq[onnx]'") from e
    return onnx
