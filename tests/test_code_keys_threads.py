"""Step keys on a Dask worker: CPython 3.11 fails an ``ast.parse`` when another thread of the process (the worker's
event loop unpickling the next task) builds syntax trees at the same time ("AST constructor recursion depth
mismatch", gh-106905), although the tree is fine. Seen on the deployed nightly on ``make cluster-up``: ``levels
BTCUSDT`` failed and the run with it. The key is computed again instead; any other error still surfaces."""

from __future__ import annotations

import ast

import pytest

from pricelevel.core import cache


def _flaky_parse(failures: int, message: str):
    real, calls = ast.parse, {"n": 0}

    def parse(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise SystemError(message)
        return real(*args, **kwargs)

    return parse


def test_a_parse_upset_by_another_thread_is_retried_and_gives_the_same_key(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = cache.code_fingerprint("pricelevel.levels.history")
    monkeypatch.setattr(cache.ast, "parse", _flaky_parse(2, "AST constructor recursion depth mismatch (before=63, after=93)"))
    assert cache.code_fingerprint("pricelevel.levels.history") == expected


def test_any_other_parse_error_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache.ast, "parse", _flaky_parse(1, "something else"))
    with pytest.raises(SystemError, match="something else"):
        cache.code_fingerprint("pricelevel.levels.history")
