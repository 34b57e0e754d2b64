"""Prompt forms accepted by LLM.generate and LLMEngine.add_request, as vLLM's.

A dict prompt may carry vLLM's `cache_salt`: only requests with the same salt share prefix-cache
blocks (core/block_hash.py)."""

from __future__ import annotations

from typing import TypedDict

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    prompt: str
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    cache_salt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt | list[int]


def cache_salt_of(prompt: PromptType) -> str | None:
    """The prompt's cache_salt (None for plain texts and token lists); a non-string is refused."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError("cache_salt must be a non-empty string")
    return salt
