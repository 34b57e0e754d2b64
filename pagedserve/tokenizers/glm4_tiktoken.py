"""GLM-4's tokenizer (THUDM/glm-4-9b-chat, `ChatGLMModel` layout) from its published
`tokenizer.model`, through the `tiktoken` library, without running the checkpoint's own
tokenization_chatglm.py (`ChatGLM4Tokenizer`; that needs --trust-remote-code).

    tokenizer.model    a tiktoken BPE file despite the name (not SentencePiece): one line per
                       mergeable token, base64(token bytes) SPACE rank; ranks 0..n-1
    special tokens     ids n, n+1, ... in this order (as published; glm-4-9b-chat: n = 151329):

        +0 <|endoftext|>  +1 [MASK]  +2 [gMASK]  +3 [sMASK]  +4 <sop>  +5 <eop>
        +6 <|system|>  +7 <|user|>  +8 <|assistant|>  +9 <|observation|>
        +10 <|begin_of_image|>  +11 <|end_of_image|>  +12 <|begin_of_video|>  +13 <|end_of_video|>

    split              cl100k's pre-tokenizer regex (digits in runs of at most three)

Encoding with special tokens prefixes [gMASK] <sop> (the published build_inputs_with_special_tokens);
special-token text is matched whole (the published tokenizer_config.json lists all fourteen as
added tokens), so the chat template's "[gMASK]<sop><|user|>" is three ids. eos = pad =
<|endoftext|>; generation_config.json adds <|user|> and <|observation|> as stop ids. Ids between
the tokenizer's size and the model's padded_vocab_size decode to no text.

When the checkpoint carries no chat template, GLM-4's format renders (its template without the
tool-prompt branch; glm-4-9b-chat ships its full template, which then wins):

    [gMASK]<sop><|system|>\\nSYSTEM<|user|>\\nQUESTION<|assistant|>\\nANSWER<|user|>\\n...<|assistant|>
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from pagedserve.tokenizers.qwen_tiktoken import TiktokenVocab, load_tiktoken_ranks

__all__ = ["GLM4_CHAT_TEMPLATE", "GLM4_PAT_STR", "GLM4_SPECIAL_TOKENS", "Glm4TiktokenTokenizer",
           "is_tiktoken_bpe_file"]

GLM4_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
GLM4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>")
ENDOFTEXT = GLM4_SPECIAL_TOKENS[0]

# A message renders only when it has content; metadata (a tool name on an assistant/observation
# turn; undefined renders as "") goes between the role token and the newline. The newline follows
# an expression, not a block tag: transformers renders with trim_blocks, which would eat it.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for item in messages %}{% if item['content'] %}"
    "<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def is_tiktoken_bpe_file(path: str | Path) -> bool:
    """True when the file's first line is `base64 SPACE integer` (a tiktoken BPE file); a
    SentencePiece model is a binary protobuf and fails this at once."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    fields = first.split()
    if len(fields) != 2 or not fields[1].isdigit():
        return False
    try:
        base64.b64decode(fields[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


class Glm4TiktokenTokenizer(TiktokenVocab):
    """tiktoken Encoding over GLM-4's ranks and special tokens, with the part of the transformers
    tokenizer interface the engine and server use (as QwenTiktokenTokenizer offers)."""

    is_fast = False

    def __init__(self, ranks: dict[bytes, int], chat_template: str | None = None, name_or_path: str = "",
                 model_max_length: int | None = None) -> None:
        import tiktoken

        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("tokenizer.model: the ranks are not 0..n-1")
        self._n = len(ranks)
        self._special = {tok: self._n + i for i, tok in enumerate(GLM4_SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding("glm4", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks,
                                           special_tokens=self._special)
        self._id_to_bytes = {rank: tok for tok, rank in ranks.items()}
        # the Encoding under the name the published class gives it: xgrammar's TokenizerInfo
        # recognizes a tiktoken tokenizer by it (structured outputs, a raw-bytes vocabulary)
        self.tokenizer = self._encoding
        self.chat_template = chat_template if chat_template is not None else GLM4_CHAT_TEMPLATE
        self.name_or_path = name_or_path
        self.model_max_length = model_max_length if model_max_length is not None else 128000
        self.padding_side = "left"
        self.eos_token = ENDOFTEXT
        self.eos_token_id = self._special[ENDOFTEXT]
        self.pad_token = ENDOFTEXT
        self.pad_token_id = self.eos_token_id
        self.bos_token: str | None = None
        self.bos_token_id: int | None = None
        self.prefix_ids = [self._special["[gMASK]"], self._special["<sop>"]]

    @classmethod
    def from_pretrained(cls, path: str) -> Glm4TiktokenTokenizer:
        """From a checkpoint directory: tokenizer.model, and from tokenizer_config.json its chat
        template and model_max_length (chat_template.jinja also read). Added tokens the config
        lists must carry the ids GLM-4 numbers them with."""
        folder = Path(path)
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        max_len = cfg.get("model_max_length") if isinstance(cfg.get("model_max_length"), int) else None
        tok = cls(load_tiktoken_ranks(folder / "tokenizer.model"), template, str(folder), max_len)
        for index, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = str(entry.get("content"))
            if content in tok._special and tok._special[content] != int(index):
                raise ValueError(f"{path!r}: added token {content!r} has id {index}, GLM-4 numbers it "
                                 f"{tok._special[content]} (tokenizer.model has {tok._n} ranks)")
        return tok

    # ------------------------------------------------------------------ vocabulary

    def get_vocab(self) -> dict[bytes | str, int]:
        """Token -> id as the published get_vocab gives it: an ordinary token as its bytes (one
        of a multi-byte character is no text on its own), a special token as its text."""
        vocab: dict[bytes | str, int] = {tok: i for i, tok in self._id_to_bytes.items()}
        vocab.update(self._special)
        return vocab

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """A token's text (its bytes as UTF-8, invalid sequences replaced), specials by name,
        padded-vocab ids as ""."""
        if isinstance(ids, int):
            return self._token_text(ids)
        return [self._token_text(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_text(self, token_id: int) -> str:
        if self._n <= token_id < self._n + len(GLM4_SPECIAL_TOKENS):
            return GLM4_SPECIAL_TOKENS[token_id - self._n]
        token = self._id_to_bytes.get(token_id)
        return "" if token is None else token.decode("utf-8", errors="replace")

    def _token_id(self, token: str) -> int:
        if token in self._special:
            return self._special[token]
        return self._encoding.encode_single_token(token.encode("utf-8"))

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        """Text -> ids (no normalization, as published); special-token text becomes the special
        token; [gMASK] <sop> first when add_special_tokens."""
        ids = self._encoding.encode(text, allowed_special="all", disallowed_special=())
        return self.prefix_ids + ids if add_special_tokens else ids

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        ids = self.encode(text, **kwargs)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        # ids past the tokenizer (padded_vocab_size) have no text; tiktoken would raise on them
        limit = self._n if skip_special_tokens else self._encoding.n_vocab
        return self._encoding.decode([i for i in ids if 0 <= i < limit], errors="replace")

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, conversation: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tools: list[dict[str, Any]] | None = None, tokenize: bool = True,
                            **kwargs: Any) -> str | list[int]:
        """Render with transformers' own jinja renderer; ids (the template holds [gMASK] <sop>:
        none added) when `tokenize`."""
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = {k: v for k, v in kwargs.items() if k not in ("return_dict", "return_tensors")}
        # transformers 5 returns (rendered conversations, generation indices)
        result: Any = render_jinja_template(
            conversations=[conversation], tools=cast(Any, tools),
            chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            eos_token=self.eos_token, bos_token="", **kwargs)
        text = str(result[0][0])
        return self.encode(text, add_special_tokens=False) if tokenize else text
