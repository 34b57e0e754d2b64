"""Quantization methods; importing the package registers the published formats (base.py's registry)."""

from pagedserve.model_executor.quantization import awq, gptq  # noqa: F401  (registration)
