"""core/ must stay pure Python: importing every core module loads neither torch nor numpy."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_torch() -> None:
    code = (
        "import sys, pkgutil, importlib, pagedserve.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__):\n"
        "    importlib.import_module('pagedserve.core.' + m.name)\n"
        "import pagedserve.sampling_params\n"
        "bad = [name for name in ('torch', 'numpy', 'transformers') if name in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"core imported {result.stdout.strip()}"
