"""Checkpoints: atomic writes and safe loads (``weights_only=True``); rebuilding a model from
one is :func:`mixq.train.build.load_model`.

A mixq checkpoint is a ``torch.save`` dict holding only tensors and plain data::

    {"format": "mixq-checkpoint", "version": 1, "config": <TrainConfig as dict>,
     "model": state_dict, "optimizer": ..., "scheduler": ..., "epoch": completed epochs,
     "best": {...}, "rng": {...}, "metrics": {...}}

It is loaded with ``torch.load(..., weights_only=True)``, so a crafted file cannot run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "mixq-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The temp file ``.NAME.*.tmp`` is removed on any error; one left by a kill is removed by
    the next ``mixq train`` that takes the run folder's lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # say which file (e.g. a full disk)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` (plus format tags) atomically: a kill never leaves half a file."""
    import io

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a mixq checkpoint safely; clear errors for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated, or not a torch file ({e})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a mixq checkpoint (no 'format: {FORMAT}' tag); "
            "a plain state dict can be used as a float init (--init)"
        )
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{str(path)!r} has a newer checkpoint version {ckpt['version']}")
    return ckpt


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a mixq checkpoint, a plain ``state_dict`` file, or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"float checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError("reading .safetensors needs: pip install safetensors") from None
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {str(path)!r}: corrupt or not a torch file ({e})"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} holds no state dict of tensors")
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
    """``model.load_state_dict(state)`` with one clear error listing every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}")
        raise CheckpointError(
            f"checkpoint {source!r} does not fit the model: "
            + "; ".join(parts)
            + ". Check the model name and num_classes in the config."
        )
    model.load_state_dict(state)
