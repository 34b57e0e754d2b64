"""The ChatGLM2/ChatGLM3 tokenizer, built by us from the published `tokenizer.model` (a
SentencePiece model) with the sentencepiece library: the checkpoint's tokenization_chatglm.py is
never imported (that needs --trust-remote-code, which hands the job to transformers).

Ids: the SentencePiece pieces 0..n-1, then GLM's special tokens at n, n+1, ... in this order
(as the published tokenizer numbers them; ChatGLM2/3-6B: n = 64789, [gMASK] = 64790, sop = 64792,
"<|user|>" = 64795):

    [MASK] [gMASK] [sMASK] sop eop  <|system|> <|user|> <|assistant|> <|observation|>

(the four role tokens are ChatGLM3's; a ChatGLM2 tokenizer_config.json that lists added tokens
without them gets the first five only). Encoding with special tokens prefixes [gMASK] sop; eos is
the pieces' </s>, pad and unk <unk>. The special tokens are matched whole in text, so the chat
template's "[gMASK]sop<|user|>" becomes three ids.

ChatGLM3's chat format (its build_chat_input: role token, "\\n", the message; [gMASK] sop first;
<|assistant|> to prompt a reply) and ChatGLM2's ("[Round N]\\n\\n问：...\\n\\n答：") as templates,
used when tokenizer_config.json carries none. GLM-4's tokenizer.model is a tiktoken file, not
read here (refused with a clear error): pagedserve/tokenizers/glm4_tiktoken.py builds that one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

__all__ = ["CHATGLM2_CHAT_TEMPLATE", "CHATGLM3_CHAT_TEMPLATE", "ChatGLMTokenizer", "load_chatglm_tokenizer"]

GLM_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

CHATGLM3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}[gMASK]sop{% endif %}"
    "<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ChatGLM2's prompt (its modeling code's build_prompt; the tokenizer then prefixes [gMASK] sop):
# "[Round 1]\n\n问：{query}\n\n答：{response}\n\n[Round 2]\n\n问：..." ending in "答：".
CHATGLM2_CHAT_TEMPLATE = (
    "[gMASK]sop{% set ns = namespace(round=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.round = ns.round + 1 %}"
    "[Round {{ ns.round }}]\n\n问：{{ message['content'] }}\n\n答："
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
)


class ChatGLMTokenizer(SentencePieceBackend):
    """A transformers slow tokenizer over the SentencePiece model (encode, decode,
    apply_chat_template, convert_ids_to_tokens as transformers gives them)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, role_tokens: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("pad_token", "<unk>")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("padding_side", "left")
        super().__init__(vocab_file=vocab_file, **kwargs)
        base = self.sp_model.get_piece_size()
        specials = GLM_TOKENS + (ROLE_TOKENS if role_tokens else ())
        self.add_tokens(list(specials), special_tokens=True)
        for i, token in enumerate(specials):  # numbered after the pieces, in published order
            if self.convert_tokens_to_ids(token) != base + i:
                raise ValueError(f"{vocab_file}: special token {token!r} would not get id {base + i} "
                                 f"(it is a SentencePiece piece)")

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """[gMASK] sop A (and B </s> for a pair), as the published tokenizer builds them."""
        prefix = [self._added_tokens_encoder["[gMASK]"], self._added_tokens_encoder["sop"]]
        ids = prefix + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [int(self.eos_token_id)]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def _convert_id_to_token(self, index: int) -> str:
        # ids between the tokenizer's size and the model's padded_vocab_size have no text
        if not 0 <= index < self.sp_model.get_piece_size():
            return ""
        return str(self.sp_model.IdToPiece(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces back to text through SentencePiece (byte-fallback pieces rejoin into UTF-8);
        special tokens are written as their text."""
        text, run = "", list[str]()
        for token in tokens:
            if token in self.added_tokens_encoder:
                text += self.sp_model.decode(run) + token
                run = []
            elif token:  # "" is a padding id (no text)
                run.append(token)
        return text + self.sp_model.decode(run)


def load_chatglm_tokenizer(model_dir: str) -> ChatGLMTokenizer:
    """The tokenizer of a ChatGLM2/3 checkpoint directory (tokenizer.model, and
    tokenizer_config.json's chat_template / model_max_length when present)."""
    path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir!r} has no tokenizer.model (the ChatGLM SentencePiece model)")
    cfg: dict[str, Any] = {}
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    if cfg.get("tokenizer_class") == "ChatGLM4Tokenizer":  # tokenizer.model is a tiktoken file there
        raise ValueError(f"{model_dir!r}: GLM-4's tokenizer (ChatGLM4Tokenizer) is a tiktoken file, built by "
                         f"Glm4TiktokenTokenizer; pass --trust-remote-code to use the checkpoint's own")
    added = {str(t.get("content")) for t in (cfg.get("added_tokens_decoder") or {}).values()}
    role_tokens = not added or "<|user|>" in added  # a ChatGLM2 list has no role tokens
    kwargs: dict[str, Any] = {"chat_template": cfg.get("chat_template") or
                              (CHATGLM3_CHAT_TEMPLATE if role_tokens else CHATGLM2_CHAT_TEMPLATE)}
    if isinstance(cfg.get("model_max_length"), int):
        kwargs["model_max_length"] = cfg["model_max_length"]
    return ChatGLMTokenizer(path, role_tokens=role_tokens, **kwargs)
