"""Presets: every experiment of the paper as a YAML file, named after its table row.

The files live next to this module, one per preset; the preset's name is the file's path
without ``.yaml`` (``cifar10/resnet20/u3-w70kb-amax8kb`` is
``cifar10/resnet20/u3-w70kb-amax8kb.yaml``). Each is a partial
:class:`~mixq.train.config.TrainConfig`, readable and copyable as a ``--config`` file;
``mixq presets`` lists them and ``mixq presets --show NAME`` prints one. Names:

* ``cifar10/resnet20/float``: the float baseline (lr 0.1, spec 7.1).
* Table 1 (no memory constraint): ``t1-{u1,u2,u3,p1,p2,p3}-{w,wa}-{random,float}``, i.e.
  parametrization U1 ``b_d``, U2 ``b_qmax``, U3 ``d_qmax``, P1 ``b_qmin``, P2 ``b_qmax``,
  P3 ``qmin_qmax``; weights only or weights + activations; from a random or a float init.
* Table 3: ``fixed-{u,p}-w2[a4]`` (fixed 2-bit weights [4-bit activations]),
  ``tqt-{u,p}-w2[a4]`` (learned range at fixed bits), ``{u3,p3}-w70kb`` (8a),
  ``{u3,p3}-w70kb-asum92kb`` (8a + 8b), ``{u3,p3}-w70kb-amax8kb`` (8a + 8c).
* ``cifar10/resnet20/15ep/ROW``: every float-init Table 1 row and every Table 3 row
  compressed to a 15-epoch fine-tune by one rule (:data:`SHORT_RULE`), for the paper-table
  runs on a CPU (``docs/results.md``).
* Short CPU recipes: ``float-30ep`` and ``u3-w70kb-15ep`` (``docs/experiments/cifar10.md``).
* ``digits/smallcnn/...``: the embedded default on scikit-learn's 8x8 digits.
* Table 4 (ImageNet, spec 7.2, 8.3): ``imagenet/{resnet18,mobilenet_v2}/...``: ``float-eval``
  (evaluate a pretrained float checkpoint, ``eval_only``), ``fixed-w4a4``, ``tqt-w4a4`` and
  the learned ``u3-w5.40mb-amax0.38mb`` / ``u3-w1.55mb-amax0.57mb`` (8a + 8c). Budgets:
  ``activation_max`` is the exact 4-bit size of the largest ReLU output (ResNet-18:
  64x112x112 -> 392 KiB, printed 0.38 MB; MobileNetV2: 96x112x112 -> 588 KiB, 0.57 MB); the
  weight budgets are Table 4's learned sizes (5.40 MB, 1.55 MB).

Learning rates follow the reference cfg sections (spec 9.2): 0.03 for quantized runs, 0.003 for
P1, Adam 0.001 for the float-init uniform Table 1 rows (the runs its ``get_res.py`` reads).
A preset whose ``init`` is ``REQUIRED`` needs ``--init PATH`` (a float checkpoint).
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from typing import Any

import yaml

__all__ = ["DEFAULT_PRESET", "FLOAT_INIT", "PRESETS", "SHORT_RULE", "get_preset"]

FLOAT_INIT = "needs a float checkpoint: --init PATH (e.g. the best.pt of cifar10/resnet20/float)"
DEFAULT_PRESET = "digits/smallcnn/u3-w6kb-amax0.5kb"
SHORT_RULE = (
    "the paper's schedule compressed to 15 epochs: the learning rate divided by 10 at the same "
    "fractions of the run as after epochs 80 and 120 of 160 (epochs 7.5 and 11.25, i.e. steps "
    "2925 and 4387 at 390 steps per epoch); everything else as the row's paper preset"
)


def _load_all() -> dict[str, dict[str, Any]]:
    root = resources.files(__name__)
    out: dict[str, dict[str, Any]] = {}
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith(("_", ".")):
                stack.append((entry, f"{prefix}{entry.name}/"))
            elif entry.name.endswith(".yaml"):
                out[prefix + entry.name.removesuffix(".yaml")] = yaml.safe_load(entry.read_text())
    return dict(sorted(out.items()))


#: Preset name -> config data (plain YAML data; :func:`get_preset` returns a copy).
PRESETS: dict[str, dict[str, Any]] = _load_all()


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``; ``ValueError`` with suggestions for an unknown name."""
    if name not in PRESETS:
        hints = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.5)
        extra = f" Did you mean {hints}?" if hints else " List them with: mixq presets"
        raise ValueError(f"unknown preset {name!r}.{extra}")
    return copy.deepcopy(PRESETS[name])
