"""The repository's scripts (benchmarks/, scripts/) as modules, for the tests that run them or check the
tables they write: they are files, not a package, so each is loaded from its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """``relative`` (e.g. ``"benchmarks/decode.py"``) loaded as a fresh module, registered under its own
    name while it loads (a dataclass of the script looks its module up by name)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"repo_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
