"""Tokenizers of checkpoints that ship only a SentencePiece `tokenizer.model` and a remote-code
tokenizer class (Baichuan's `BaichuanTokenizer`, ...), built by us with the sentencepiece library
so that no checkpoint code runs (without --trust-remote-code).

    load_sentencepiece_tokenizer(dir)  -> SentencePieceTokenizer | None (None: not such a checkpoint)

`SentencePieceTokenizer` is a transformers slow tokenizer (`SentencePieceBackend`), so encode /
decode / apply_chat_template / special tokens behave as every other tokenizer of the engine:

  * text -> pieces: the model's own `sp.encode` (its normalizer, dummy-prefix and byte-fallback
    settings as trained); special tokens from tokenizer_config.json are split off first;
  * pieces -> text: runs of ordinary pieces through `sp.decode` (byte-fallback pieces <0xE4>...
    become UTF-8 again), special tokens spliced in as written;
  * `add_bos_token` / `add_eos_token` of tokenizer_config.json (defaults: bos yes, eos no, as the
    Llama-derived remote classes);
  * chat: the config's `chat_template` if any, else a family's `chat_template` argument.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

__all__ = ["SentencePieceTokenizer", "load_sentencepiece_tokenizer", "needs_own_tokenizer"]

MODEL_FILE = "tokenizer.model"


class SentencePieceTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, *, add_bos_token: bool = True, add_eos_token: bool = False,
                 **kwargs: Any) -> None:
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("legacy", True)  # plain sp.encode (the model's own dummy-prefix rule)
        super().__init__(vocab_file=vocab_file, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out += bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if t in special else 0 for t in token_ids_0]
        bos = [1] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [1] if self.add_eos_token and self.eos_token_id is not None else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        special = set(self.all_special_tokens)
        out: list[str] = []
        run: list[str] = []  # ordinary pieces since the last special token
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def needs_own_tokenizer(tokenizer_dir: str) -> bool:
    """True for a directory whose tokenizer transformers could only build by running checkpoint
    code: a `tokenizer.model`, no `tokenizer.json`, and a tokenizer class that is remote code
    (`auto_map` in tokenizer_config.json) or unknown to transformers."""
    if not os.path.isfile(os.path.join(tokenizer_dir, MODEL_FILE)):
        return False
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        return False
    config = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json"))
    if "AutoTokenizer" in (config.get("auto_map") or {}):
        return True
    import transformers

    cls = config.get("tokenizer_class")
    return isinstance(cls, str) and not hasattr(transformers, cls)


def load_sentencepiece_tokenizer(tokenizer_dir: str, chat_template: str | None = None,
                                 extra_special_tokens: list[str] | None = None) -> SentencePieceTokenizer:
    """Our tokenizer for `tokenizer_dir` (tokenizer.model + tokenizer_config.json's special
    tokens and flags). `chat_template` is used when the config has none; `extra_special_tokens`
    (a family's role tokens, pieces of the model) are split off as whole tokens."""
    config = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json"))
    kwargs: dict[str, Any] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _token(config.get(key))
        if value is not None:
            kwargs[key] = value
    extra = [t for t in (_token(v) for v in config.get("additional_special_tokens") or []) if t]
    extra += [t for t in extra_special_tokens or [] if t not in extra]
    if extra:
        kwargs["additional_special_tokens"] = extra
    template = config.get("chat_template") or chat_template
    if template is not None:
        kwargs["chat_template"] = template
    if isinstance(config.get("model_max_length"), int):
        kwargs["model_max_length"] = config["model_max_length"]
    return SentencePieceTokenizer(
        os.path.join(tokenizer_dir, MODEL_FILE),
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        **kwargs,
    )
