"""pagedserve: a paged-KV-cache LLM inference engine with vLLM's API.

Top-level names load lazily, so that `import pagedserve.core` stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedserve.engine.llm",
    "LLMEngine": "pagedserve.engine.llm_engine",
    "EngineArgs": "pagedserve.config",
    "SamplingParams": "pagedserve.sampling_params",
    "RequestOutputKind": "pagedserve.sampling_params",
    "StructuredOutputsParams": "pagedserve.sampling_params",
    "RequestOutput": "pagedserve.outputs",
    "CompletionOutput": "pagedserve.outputs",
    "TextPrompt": "pagedserve.inputs",
    "TokensPrompt": "pagedserve.inputs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
