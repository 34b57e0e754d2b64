"""TEST-ONLY packers: rewrite an unquantized checkpoint as a published quantized format.

Each format module (gptq.py, awq.py, ...) holds a `TensorQuantizer`, written from the format's
published layout with round-to-nearest quantization (not the GPTQ algorithm). `quantize_checkpoint`
drives one over every linear projection of a checkpoint and returns the dequantized weights, which
tests load into an unquantized float32 copy (`write_dequantized_checkpoint`) as the oracle.
"""

from pagedserve.testing.quant_pack.common import (
    LINEAR_SUFFIXES,
    QuantizedTensor,
    TensorQuantizer,
    quantize_checkpoint,
    write_dequantized_checkpoint,
)

__all__ = ["LINEAR_SUFFIXES", "QuantizedTensor", "TensorQuantizer", "quantize_checkpoint",
           "write_dequantized_checkpoint"]
