"""Restricted unpickling for dataset files (CIFAR-10 python batches).

``pickle.load`` can run arbitrary code: any importable callable named in the stream is
called. The CIFAR-10 batch files only need numpy's array/dtype/scalar reconstructors and,
for Python-3-written protocol-2 pickles, ``_codecs.encode`` (how bytes are stored there)
and ``bytes()`` (for empty bytes). Everything else is refused.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from typing import IO, Any

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "safe_load_pickle", "safe_loads"]


def _numpy_attr(module: str, name: str) -> Any:
    """Resolve a numpy internal, preferring ``numpy._core`` (numpy 2) over ``numpy.core``."""
    suffix = module.split(".", 2)[2] if module.count(".") >= 2 else ""
    candidates = [f"numpy._core.{suffix}", f"numpy.core.{suffix}"] if suffix else [module]
    for candidate in candidates:
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name} in this version")


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to the latin-1 form that pickle uses for bytes."""
    normalized = str(encoding).lower().replace("-", "").replace("_", "")
    if normalized not in {"latin1", "iso88591"} or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1", errors)


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` restricted to no arguments (how protocol 2 stores ``b""``)."""
    if args:
        raise pickle.UnpicklingError("refused bytes() with arguments")
    return b""


#: ``(module, name)`` pairs the restricted unpickler resolves; everything else is refused.
#: ``numpy.core`` is numpy 1 (and the Python 2 official files), ``numpy._core`` numpy 2.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("builtins", "bytes"),
        ("__builtin__", "bytes"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals listed in :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed global ``module.name`` or refuse it.

        Raises:
            pickle.UnpicklingError: If the global is not on the allow list.
        """
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}': only numpy arrays and plain "
                "containers are allowed in dataset pickles"
            )
        if module == "_codecs":
            return _latin1_encode
        if name == "bytes":
            return _empty_bytes
        if module == "numpy":
            import numpy

            return getattr(numpy, name)
        return _numpy_attr(module, name)


def safe_load_pickle(path_or_file: str | os.PathLike[str] | IO[bytes]) -> dict[Any, Any]:
    """Load a pickled dict holding numpy arrays without allowing arbitrary code.

    Args:
        path_or_file: A path, or a binary file object positioned at the pickle.

    Returns:
        The unpickled dict. Strings written by Python 2 come back as ``bytes``
        (``encoding="bytes"``), so keys may be ``bytes`` (official CIFAR files) or ``str``.

    Raises:
        pickle.UnpicklingError: If the stream names a forbidden global or is not a dict.
        EOFError: If the stream is truncated.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            return safe_load_pickle(f)
    obj = RestrictedUnpickler(path_or_file, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"expected a pickled dict, got {type(obj).__name__}")
    return obj


def safe_loads(data: bytes) -> dict[Any, Any]:
    """Like :func:`safe_load_pickle` for in-memory bytes."""
    return safe_load_pickle(io.BytesIO(data))
