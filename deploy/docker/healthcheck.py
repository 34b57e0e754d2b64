"""Docker HEALTHCHECK: exit 0 when GET /health on this container's port answers 200, else 1.

The server answers 503 while loading, restarting or draining, so a draining container reads as
unhealthy only after its --start-period (plain Docker; Kubernetes uses its own probes).
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("PAGEDSERVE_PORT") or ("9000" if os.environ.get("PAGEDSERVE_COMMAND") == "router" else "8000")
scheme = "https" if os.environ.get("PAGEDSERVE_HEALTHCHECK_TLS") else "http"
try:
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError):
    sys.exit(1)
