"""Fixtures shared with the engine and server tests (found by pytest through these imports): the
HF greedy references and the in-process tp=1 LLM of the tiny llama."""

from tests.engine.conftest import greedy_reference  # noqa: F401
from tests.server.conftest import offline_llm  # noqa: F401
