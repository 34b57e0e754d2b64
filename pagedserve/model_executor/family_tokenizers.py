"""Tokenizers of the remote-code families, built by us from their published files when the
config was read by our adapter (no --trust-remote-code): model_type -> loader. None: the family
ships a tokenizer transformers reads without checkpoint code (tokenizer.json)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_family_tokenizer"]


def load_family_tokenizer(model_dir: str, model_type: str) -> Any | None:
    if model_type == "chatglm" and os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        from pagedserve.model_executor.chatglm_tokenizer import load_chatglm_tokenizer

        return load_chatglm_tokenizer(model_dir)
    return None
