"""Qwen (v1) tokenizer from its published `qwen.tiktoken`, through the `tiktoken` library, without
running the checkpoint's own tokenization_qwen.py (that needs --trust-remote-code).

    qwen.tiktoken      one line per mergeable token: base64(token bytes) SPACE rank
    special tokens     ids len(ranks), len(ranks)+1, ...: <|endoftext|>, <|im_start|>, <|im_end|>,
                       <|extra_0|> ... <|extra_204|> (as published; Qwen-7B: 151643 ...)

The object offers the part of the transformers tokenizer interface the engine and server use
(encode, decode, convert_ids_to_tokens, apply_chat_template, eos_token_id, chat_template, len).
It has no Rust backend, so incremental detokenization re-decodes (output_processor.py).
When the checkpoint carries no chat template, ChatML renders as Qwen's `make_context` does:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n...<|im_end|>
    \\n<|im_start|>assistant\\n
"""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

__all__ = ["CHATML_TEMPLATE", "QWEN_PAT_STR", "QWEN_SPECIAL_TOKENS", "QwenTiktokenTokenizer", "TIKTOKEN_FILE",
           "is_qwen_tiktoken_dir"]

TIKTOKEN_FILE = "qwen.tiktoken"
# Qwen's pre-tokenizer split (the published PAT_STR, a regex in tiktoken's dialect).
QWEN_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END,
                                        *(f"<|extra_{i}|>" for i in range(205)))

# Messages joined by "\n"; a default system turn first when the conversation has none.
CHATML_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}"
)


def is_qwen_tiktoken_dir(path: str) -> bool:
    """A tokenizer directory with Qwen's tiktoken file and no tokenizer.json of its own."""
    folder = Path(path)
    return (folder / TIKTOKEN_FILE).is_file() and not (folder / "tokenizer.json").is_file()


def load_tiktoken_ranks(file: str | Path) -> dict[bytes, int]:
    """Parse a .tiktoken file (read directly: tiktoken's own loader caches by path in /tmp)."""
    ranks: dict[bytes, int] = {}
    for line in Path(file).read_bytes().splitlines():
        if not line.strip():
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


class TiktokenVocab:
    """The vocabulary queries of a tokenizer over a tiktoken Encoding (`_encoding`) with its special
    tokens (`_special`: text -> id); shared by the Qwen v1 and GLM-4 tokenizers."""

    _encoding: Any
    _special: dict[str, int]

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def __len__(self) -> int:
        return self._encoding.n_vocab

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self._special)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._special.values())


class QwenTiktokenTokenizer(TiktokenVocab):
    """tiktoken Encoding over Qwen's ranks and special tokens, with a transformers-like surface."""

    is_fast = False

    def __init__(self, ranks: dict[bytes, int], chat_template: str | None = None,
                 name_or_path: str = "") -> None:
        import tiktoken

        self._special = {tok: len(ranks) + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding("qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks,
                                           special_tokens=self._special)
        self._id_to_bytes = {rank: tok for tok, rank in ranks.items()}
        self._special_ids = frozenset(self._special.values())
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE
        self.name_or_path = name_or_path
        self.eos_token = ENDOFTEXT
        self.eos_token_id = self._special[ENDOFTEXT]
        self.pad_token_id = self.eos_token_id  # published generation_config: pad = eod
        self.bos_token: str | None = None
        self.bos_token_id: int | None = None

    @classmethod
    def from_pretrained(cls, path: str) -> QwenTiktokenTokenizer:
        """From a checkpoint directory: qwen.tiktoken, and a chat template if the checkpoint
        has one (tokenizer_config.json `chat_template` or chat_template.jinja)."""
        folder = Path(path)
        template: str | None = None
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            value = json.loads(config_file.read_text()).get("chat_template")
            template = value if isinstance(value, str) else None
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(load_tiktoken_ranks(folder / TIKTOKEN_FILE), template, str(folder))

    # ------------------------------------------------------------------ vocabulary

    def get_vocab(self) -> dict[str, int]:
        vocab = {tok.decode("utf-8", errors="replace"): i for i, tok in self._id_to_bytes.items()}
        return {**vocab, **self._special}

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """A token's text (its bytes as UTF-8, invalid sequences replaced), specials by name."""
        if isinstance(ids, int):
            return self._token_text(ids)
        return [self._token_text(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_text(self, token_id: int) -> str:
        if token_id in self._special_ids:
            return QWEN_SPECIAL_TOKENS[token_id - self.eos_token_id]
        return self._id_to_bytes[token_id].decode("utf-8", errors="replace")

    def _token_id(self, token: str) -> int:
        if token in self._special:
            return self._special[token]
        return self._encoding.encode_single_token(token.encode("utf-8"))

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        """Text (NFC-normalized, as Qwen's tokenizer does) -> ids; special-token text becomes the
        special token (Qwen's `allowed_special="all"`). Qwen adds no BOS/EOS: add_special_tokens
        changes nothing."""
        del add_special_tokens
        return self._encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all",
                                     disallowed_special=())

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        ids = self.encode(text, **kwargs)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False,
               **_: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._encoding.decode(ids, errors="replace")

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, conversation: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tools: list[dict[str, Any]] | None = None, tokenize: bool = True,
                            **kwargs: Any) -> str | list[int]:
        """Render with transformers' own jinja renderer (same sandbox and helpers as HF
        tokenizers); ids when `tokenize`."""
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = {k: v for k, v in kwargs.items() if k not in ("return_dict", "return_tensors")}
        # transformers 5 returns (rendered conversations, generation indices)
        result: Any = render_jinja_template(
            conversations=[conversation], tools=cast(Any, tools),
            chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            eos_token=self.eos_token, bos_token="", **kwargs)
        text = str(result[0][0])
        return self.encode(text) if tokenize else text
