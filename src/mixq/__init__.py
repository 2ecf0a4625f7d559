"""mixq: mixed-precision DNNs with learned quantizers (Uhlich et al., ICLR 2020)."""

from mixq.quant import Pow2Quantizer, Quantizer, UniformQuantizer, make_quantizer

__version__ = "0.1.0"
__all__ = ["Pow2Quantizer", "Quantizer", "UniformQuantizer", "make_quantizer"]
