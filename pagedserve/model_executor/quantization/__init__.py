from pagedserve.model_executor.quantization import fp8 as fp8  # noqa: F401 (registers "fp8")
