"""mixq: mixed-precision DNNs with learned quantizers (Uhlich et al., ICLR 2020).

The library in ten lines (the README's example, which the tests run)::

    import mixq
    from mixq.models import resnet20

    model = mixq.quantize_model(resnet20())            # uniform d_qmax, 4 bits, everywhere
    budget = mixq.Budget.parse(weight="70KB", activation_max="8KB")
    opt = torch.optim.SGD(mixq.param_groups(model, 2e-4), lr=0.03, momentum=0.9)
    step = mixq.QATStep(model, opt, budget, weight_decay=2e-4)   # the paper's recipe
    for x, y in loader:
        step(F.cross_entropy(model(x), y))             # + penalty, backward, clip, projection
    print(mixq.report(model, budget).to_text())
"""

from mixq.config import LayerOverride, QuantConfig, SiteConfig
from mixq.convert import (
    quantize_model,
    quantizer_parameters,
    quantizers,
    to_float,
)
from mixq.cost import Budget, activation_bits, parse_size, weight_bits
from mixq.qat import QATStep, param_groups
from mixq.quant import Pow2Quantizer, Quantizer, UniformQuantizer, make_quantizer
from mixq.report import Report, report

__version__ = "0.1.0"
__all__ = [
    "Budget",
    "LayerOverride",
    "Pow2Quantizer",
    "QATStep",
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
