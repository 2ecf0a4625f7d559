"""The paper's learned quantizers: uniform (U1-U3) and power-of-two (P1-P3).

See docs/method.md sections 1-3 and 5.2. ``kind/parametrization`` strings name them, e.g.
``"uniform/d_qmax"``; :func:`make_quantizer` builds one from such a string.
"""

from mixq.quant.base import PARAMETRIZATIONS, Quantizer, check_parametrization
from mixq.quant.bounds import Bounds, default_bounds
from mixq.quant.functional import fake_quant_pow2, fake_quant_uniform
from mixq.quant.pow2 import Pow2Quantizer
from mixq.quant.registry import QUANTIZER_KINDS, make_quantizer, parse_spec
from mixq.quant.uniform import UniformQuantizer

__all__ = [
    "PARAMETRIZATIONS",
    "QUANTIZER_KINDS",
    "Bounds",
    "Pow2Quantizer",
    "Quantizer",
    "UniformQuantizer",
    "check_parametrization",
    "default_bounds",
    "fake_quant_pow2",
    "fake_quant_uniform",
    "make_quantizer",
    "parse_spec",
]
