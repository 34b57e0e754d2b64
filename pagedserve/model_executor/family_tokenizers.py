"""Tokenizers of the remote-code families, built by us from their published files when the
config was read by our adapter (no --trust-remote-code): model_type -> loader. None: the family
ships a tokenizer transformers reads without checkpoint code (tokenizer.json).

ChatGLM's `tokenizer.model` is SentencePiece for ChatGLM2/3 and a tiktoken BPE file for GLM-4
(same name, same model_type): told apart by the file's content."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_family_tokenizer"]


def load_family_tokenizer(model_dir: str, model_type: str) -> Any | None:
    path = os.path.join(model_dir, "tokenizer.model")
    if model_type == "chatglm" and os.path.isfile(path):
        from pagedserve.tokenizers.glm4_tiktoken import Glm4TiktokenTokenizer, is_tiktoken_bpe_file

        if is_tiktoken_bpe_file(path):  # GLM-4 (ChatGLM4Tokenizer)
            return Glm4TiktokenTokenizer.from_pretrained(model_dir)
        from pagedserve.model_executor.chatglm_tokenizer import load_chatglm_tokenizer

        return load_chatglm_tokenizer(model_dir)
    return None
