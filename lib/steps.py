"""Where a step's output lives is derived from everything that determines it.

A step key hashes the step's real inputs: the fingerprint of the data files it reads, its config section,
the keys of the steps it depends on, and the source code of the library modules that compute it. The output
goes to ``<data.root>/derived/<step>/<key>/``; if that folder is complete, re-running the step is a no-op.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

#: Marker written last: a folder without it is an interrupted run and is rebuilt.
COMPLETE = ".complete"


def code_fingerprint(*modules: ModuleType) -> str:
    """sha256 of the modules' source: editing the code that computes a step invalidates its outputs."""
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode())
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def step_key(step: str, **inputs: Any) -> str:
    """A short, stable hash of a step's name and inputs (JSON-serialisable values; paths as strings)."""
    text = json.dumps({"step": step, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DerivedStore:
    """``<root>/derived/<step>/<key>/``: one folder per computed output, written completely or not at all."""

    def __init__(self, data_root: Path) -> None:
        self.root = Path(data_root) / "derived"

    def folder(self, step: str, key: str) -> Path:
        return self.root / step / key

    def is_complete(self, step: str, key: str) -> bool:
        return (self.folder(step, key) / COMPLETE).exists()

    def build(self, step: str, key: str, write: Callable[[Path], None]) -> tuple[Path, bool]:
        """Return ``(folder, built)``: the existing complete folder, or one made by ``write(tmp_folder)``.

        ``write`` fills a temporary sibling folder that is renamed into place, so a crash never leaves a
        half-written output that a later run would trust.
        """
        final = self.folder(step, key)
        if (final / COMPLETE).exists():
            return final, False
        tmp = final.with_name(f".{key}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "key": key}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final, True
