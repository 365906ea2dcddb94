"""A step's code key hashes what runs: a comment or docstring fix keeps every key downstream of it, a behaviour
edit changes it (README "Keys that cannot go stale")."""

from __future__ import annotations

from pathlib import Path

import pytest

from pricelevel.core.cache import code_fingerprint

ORIGINAL = '''"""A step module."""

from pricelevel.pkg import helper


def step(x):
    """Scale x."""
    return helper.scale(x) + 1  # plus one
'''

HELPER = '''"""Helpers."""


class Scale:
    """A scale."""

    factor = 2


def scale(x):
    """Twice x."""
    return x * Scale.factor
'''


def _package(root: Path, step: str = ORIGINAL, helper: str = HELPER) -> Path:
    package = root / "pricelevel"
    (package / "pkg").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "pkg" / "__init__.py").write_text("")
    (package / "pkg" / "step.py").write_text(step)
    (package / "pkg" / "helper.py").write_text(helper)
    return package


def _key(package: Path) -> str:
    return code_fingerprint("pricelevel.pkg.step", package_dir=package)


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("step", "  # plus one", "  # add one: the comment was unclear"),
        ("step", '"""Scale x."""', '"""Scale x, then add one (the docstring was wrong)."""'),
        ("step", '"""A step module."""', '"""A step module.\n\nWith a longer explanation."""'),
        ("helper", '"""A scale."""', '"""A factor."""'),
        ("helper", "    return x * Scale.factor", "\n\n    return x * Scale.factor  # layout and a comment"),
        ("helper", '    """Twice x."""\n', ""),  # a docstring removed
    ],
    ids=["comment", "docstring", "module-docstring", "class-docstring", "layout", "docstring-removed"],
)
def test_a_documentation_edit_keeps_the_key(tmp_path: Path, module: str, old: str, new: str) -> None:
    before = _key(_package(tmp_path / "a"))
    sources = {"step": ORIGINAL, "helper": HELPER}
    assert old in sources[module]
    sources[module] = sources[module].replace(old, new)
    assert _key(_package(tmp_path / "b", **sources)) == before


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("step", "+ 1", "+ 2"),
        ("helper", "factor = 2", "factor = 3"),  # deep in the closure
        ("helper", "def scale(x):", "def scale(x, offset=0):"),
    ],
    ids=["constant", "imported-module", "signature"],
)
def test_a_behaviour_edit_changes_the_key(tmp_path: Path, module: str, old: str, new: str) -> None:
    before = _key(_package(tmp_path / "a"))
    sources = {"step": ORIGINAL, "helper": HELPER}
    sources[module] = sources[module].replace(old, new)
    assert _key(_package(tmp_path / "b", **sources)) != before
