"""mixq: mixed-precision DNNs with learned quantizers (Uhlich et al., ICLR 2020).

The library in ten lines::

    import mixq
    from mixq.models import resnet20

    model = mixq.quantize_model(resnet20())            # uniform d_qmax, 4 bits, everywhere
    budget = mixq.Budget.parse(weight="70KB", activation_max="8KB")
    loss = criterion(model(x), y) + budget.penalty(model)   # lambda * relu(S - S0)^2
    ...                                                 # then q.constrain_() for each quantizer
    print(mixq.report(model, budget).to_text())
"""

from mixq.config import LayerOverride, QuantConfig, SiteConfig
from mixq.convert import (
    param_groups,
    quantize_model,
    quantizer_parameters,
    quantizers,
    to_float,
)
from mixq.cost import Budget, activation_bits, parse_size, weight_bits
from mixq.quant import Pow2Quantizer, Quantizer, UniformQuantizer, make_quantizer
from mixq.report import Report, report

__version__ = "0.1.0"
__all__ = [
    "Budget",
    "LayerOverride",
    "Pow2Quantizer",
    "QuantConfig",
    "Quantizer",
    "Report",
    "SiteConfig",
    "UniformQuantizer",
    "activation_bits",
    "make_quantizer",
    "param_groups",
    "parse_size",
    "quantize_model",
    "quantizer_parameters",
    "quantizers",
    "report",
    "to_float",
    "weight_bits",
]
