"""Quantization methods; importing the package registers the published formats (base.py's registry)."""

from pagedserve.model_executor.quantization import awq, gptq  # noqa: F401  (registration)
from pagedserve.model_executor.quantization import fp8 as fp8  # noqa: F401 (registers "fp8")
