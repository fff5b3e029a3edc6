"""The simulator. Its hot path (`COMPILED`) is compiled with Cython when the package is built
(setup.py; the .pxd beside each module adds the C types) and is the same code as the .py
source. A compiled module older than its source is never used: then all of them are loaded
from source, as they are when none is built, with one log line saying so."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

COMPILED = ("engine", "replica", "router")  # in import order: router cimports the others
_HERE = Path(__file__).resolve().parent
# a source this much newer than its build was edited after it (files unpacked together from a
# wheel differ by far less)
_SLACK_S = 1.0
log = logging.getLogger(__name__)


def _built(name: str) -> Path | None:
    for suffix in EXTENSION_SUFFIXES:
        path = _HERE / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def _why_source() -> str | None:
    """Why the hot path must run from source, or None when its compiled modules are usable."""
    if os.environ.get("ROLLOUT_SIM_SOURCE"):
        return None  # asked for explicitly: no warning
    for name in COMPILED:
        built = _built(name)
        if built is None:
            return "is not compiled (`pip install -e .` builds it; needs a C compiler)"
        made = built.stat().st_mtime
        for src in (_HERE / f"{name}.py", _HERE / f"{name}.pxd"):
            if src.exists() and src.stat().st_mtime > made + _SLACK_S:
                return f"is compiled from an older {src.name} (`make` rebuilds it)"
    return None


def compiled() -> bool:
    """Whether the hot path runs compiled in this process."""
    return all(
        not getattr(sys.modules.get(f"{__name__}.{name}"), "__file__", ".py").endswith(".py")
        for name in COMPILED
    )


def _load_sources() -> None:
    for name in COMPILED:
        spec = importlib.util.spec_from_file_location(f"{__name__}.{name}", _HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        globals()[name] = module  # as an import sets the package's attribute


_reason = _why_source()
if os.environ.get("ROLLOUT_SIM_SOURCE") or _reason is not None:
    if _reason is not None:
        log.warning(
            "the simulator's hot path %s: running its Python source, about 2x slower", _reason
        )
    if any(_built(name) for name in COMPILED):
        _load_sources()  # a built module would otherwise shadow its source
