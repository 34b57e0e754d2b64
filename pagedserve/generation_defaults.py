"""Default sampling parameters from a model's generation_config.json, as vLLM applies them.

vLLM's `--generation-config` (default "auto") reads the knobs a model's authors recommend
(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) from generation_config.json
and uses them for every request that leaves them unset; "vllm" ignores the file, and a directory
reads that directory's file instead. `--override-generation-config` (JSON) replaces single keys.

Only keys present in the file count: transformers' GenerationConfig class would add its own
defaults (top_k=50 among them) that the model's authors never chose. Pure Python (no torch).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field
_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_generation_defaults(
    model_dir: str, source: str = "auto", overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """SamplingParams keyword defaults from `source` ("auto": model_dir; "vllm": none; else a
    directory holding generation_config.json), with `overrides` (generation_config key names, or
    SamplingParams names) applied on top. Raises ValueError for a missing source directory or
    values SamplingParams rejects."""
    raw: dict[str, Any] = {}
    if source != "vllm":
        folder = model_dir if source == "auto" else source
        if source != "auto" and not os.path.isdir(folder):
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory, got {source!r}")
        path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise ValueError(f"{path} does not hold a JSON object")
            raw = loaded
    for key, value in (overrides or {}).items():
        name = next((k for k, v in _KEYS.items() if v == key), key)  # accept SamplingParams names
        if name not in _KEYS:
            raise ValueError(f"override_generation_config: unsupported key {key!r} "
                             f"(supported: {', '.join(sorted(_KEYS))})")
        raw[name] = value
    defaults = {field: raw[key] for key, field in _KEYS.items() if raw.get(key) is not None}
    if defaults:
        from pagedserve.sampling_params import SamplingParams  # validates every value

        try:
            SamplingParams(**defaults)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the generation config's sampling defaults are invalid: {e}") from None
        logger.info("default sampling parameters from the generation config: %s", defaults)
    return defaults
