"""Where a step's output lives is derived from everything that determines it.

A step key hashes the step's real inputs: the fingerprint of the data files it reads, its config section,
the keys of the steps it depends on, and the code that computes it. The code part is derived, never listed
by hand: :func:`code_fingerprint` hashes the code of every ``pricelevel`` module the step's entry points
import, directly or through others, so any edit in that closure (an engine fix, an indicator change) gives
new keys and the step runs again. It hashes what runs, the syntax tree without docstrings and comments, so
a documentation fix does not re-run every step downstream of it. The output goes to ``<data.root>/derived/<step>/<key>/``; if that folder
is complete, re-running the step is a no-op.

Builds are safe with several writers, on one machine or many: each writer fills its own uniquely named
temporary folder and renames it into place; the first rename wins and a later writer of the same key
reuses the winner's folder. A finished folder is never deleted or rewritten.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

#: Marker written last: a folder without it is an interrupted run and is rebuilt.
COMPLETE = ".complete"
PACKAGE = "pricelevel"
#: CPython 3.11's ``ast.parse`` is not thread-safe ("AST constructor recursion depth mismatch", gh-106905), and
#: keys are computed in tasks running in threads.
_PARSE_LOCK = threading.Lock()
#: The lock covers our own parses only: on a Dask worker another thread (the worker's event loop unpickling the
#: next task, Prefect) may build syntax trees at the same time, and the check fails although the tree is fine.
_PARSE_ATTEMPTS = 5


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{PACKAGE} is not importable")
    return Path(next(iter(spec.submodule_search_locations)))


def _module_file(name: str, package_dir: Path) -> Path | None:
    """The source file of ``pricelevel.a.b`` under ``package_dir`` (a module or a package), if it exists."""
    parts = name.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if parts and candidate.is_file():
            return candidate
    return package_dir / "__init__.py" if not parts else None


def _parse(source: str, path: Path) -> ast.Module:
    """``ast.parse``, again when another thread's parse upset CPython 3.11's shared recursion-depth check (the
    source is the same, so a parse that succeeds gives the same tree)."""
    for attempt in range(_PARSE_ATTEMPTS):
        try:
            with _PARSE_LOCK:
                return ast.parse(source, str(path))
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == _PARSE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _imported_names(path: Path, name: str) -> set[str]:
    """Every ``pricelevel`` module a source file imports, at the top or inside functions (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    source = path.read_text()
    tree = _parse(source, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in found if n == PACKAGE or n.startswith(PACKAGE + ".")}


def module_closure(entry_modules: Iterable[str], package_dir: Path | None = None) -> dict[str, Path]:
    """``name -> file`` of the entry modules and every ``pricelevel`` module they import, transitively
    (parent packages included, since importing ``a.b`` runs ``a/__init__.py``)."""
    package_dir = Path(package_dir) if package_dir else _package_dir()
    closure: dict[str, Path] = {}
    pending = list(entry_modules)
    while pending:
        name = pending.pop()
        if name in closure:
            continue
        path = _module_file(name, package_dir)
        if path is None:  # `from pricelevel.x import some_function`: a name, not a module
            continue
        closure[name] = path
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        pending.extend(parents)
        pending.extend(_imported_names(path, name))
    return closure


def code_text(path: Path) -> bytes:
    """What of a source file runs: its syntax tree without docstrings (comments never reach the tree), dumped
    without line numbers, so a comment, docstring or layout edit gives the same text and a behaviour edit does
    not. (A docstring is text a user may read, e.g. in ``--help``, but no step's output depends on it.)"""
    tree = _parse(path.read_text(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def code_fingerprint(*entry_points: ModuleType | Callable | type | str, package_dir: Path | None = None) -> str:
    """sha256 over the code (:func:`code_text`) of the entry points' modules and everything they import from
    ``pricelevel``.

    Entry points are modules, functions, classes or module names; ``package_dir`` (tests) reads the sources
    from another copy of the package. A module outside ``pricelevel`` counts with its own file only.
    """
    names, outside = [], {}
    for point in entry_points:
        name = point if isinstance(point, str) else point.__name__ if isinstance(point, ModuleType) else point.__module__
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            names.append(name)
        else:
            module = point if isinstance(point, ModuleType) else sys.modules[name]
            outside[name] = Path(inspect.getsourcefile(module))
    digest = hashlib.sha256()
    for name, path in sorted({**module_closure(names, package_dir), **outside}.items()):
        digest.update(name.encode() + b"\0")
        digest.update(code_text(path) + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class SymbolStep:
    """What a per-symbol step produced: where, under which key, from which candles; passed between tasks
    instead of frames, so the next task reads what it needs (on whichever worker it runs)."""

    step: str
    symbol: str
    key: str
    folder: Path
    #: sha256 over the candle files the step read.
    data_fingerprint: str
    #: False when the output existed already (a no-op re-run) or another writer finished it first.
    built: bool
    #: One line for the logs: what is in the output.
    summary: str = ""

    def describe(self) -> str:
        return f"{self.step} {self.symbol}: {'computed' if self.built else 'reused'} {self.summary} -> {self.folder}"


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
        """Return ``(folder, built)``: the complete folder for ``key``, made by ``write(tmp_folder)`` if needed.

        ``built`` is False when the folder was there already or another writer finished it first (then
        this writer's result is discarded and the winner's is returned).
        """
        final = self.folder(step, key)
        if (final / COMPLETE).exists():
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=final.parent))
        try:
            write(tmp)
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "key": key}))
            return final, _install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only this writer's own temporary folder


def _install(tmp: Path, final: Path, attempts: int = 5) -> bool:
    """Rename ``tmp`` to ``final``; False when another writer's complete folder is already there."""
    for _ in range(attempts):
        try:
            os.rename(tmp, final)  # atomic; refuses a non-empty target
            return True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if (final / COMPLETE).exists():
            return False
        # A folder without the marker (made by hand, or by code from before these rules): set it aside
        # under a unique name, then try again. Another writer may do the same at once; the loop settles it.
        aside = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"{final}: could not install a finished output after {attempts} attempts")
