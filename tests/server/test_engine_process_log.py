"""The engine-core process logs in the server's format: its settings reach it explicitly
(LogSettings, run_engine_core's argument), not through the server's environment."""

from __future__ import annotations

import json

from tests.server.conftest import RunningServer


def test_engine_process_lines_are_the_servers_json(api_server: RunningServer) -> None:
    rows = [json.loads(line) for line in api_server.log().splitlines() if line.startswith("{")]
    # "engine ready in ..." is logged by EngineCore, in the engine process only
    ready = [r for r in rows if r.get("logger") == "pagedserve.engine.engine_core"
             and r["msg"].startswith("engine ready in")]
    assert len(ready) == 1, rows[:5]
