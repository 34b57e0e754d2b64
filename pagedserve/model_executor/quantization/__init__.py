"""Quantization methods. Importing the package registers the formats whose config modules are
torch-free (gptq, awq, fp8: their layer code is imported when a layer is built); squeezellm and gguf
import torch at module level, so base.py's `_BUILTIN_MODULES` registers them when first named."""

from pagedserve.model_executor.quantization import awq, gptq  # noqa: F401  (registration)
from pagedserve.model_executor.quantization import fp8 as fp8  # noqa: F401 (registers "fp8")
