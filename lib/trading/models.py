"""Which model trades: ``models:/<name>@champion`` resolved at every bar, hot-swapped between bars when the
alias has moved, provided the new version fits the running trader (same timeframe, every traded symbol
known); otherwise the old one keeps trading and the refusal is reported."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pricelevel.ml.spec import ModelSpec

_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


@dataclass(frozen=True)
class Switch:
    """A model change decided at a bar (or refused, with ``accepted`` False and the reason)."""

    from_version: str | None
    to_version: str
    accepted: bool
    reason: str


class ModelProvider:
    """The model behind ``uri``; ``resolve(uri) -> version`` and ``load(name, version) -> model`` are the registry
    edge (injected, so tests and replays can hand in anything with ``predict``, ``spec`` and ``version``)."""

    def __init__(self, uri: str, resolve: Callable[[str], str], load: Callable[[str], object],
                 symbols: Sequence[str] | None = None) -> None:
        self.uri = uri
        self._resolve, self._load = resolve, load
        self.symbols = tuple(symbols) if symbols else None
        self.current = load(uri)
        if self.symbols is None:
            self.symbols = tuple(self.current.spec.symbols)

    @property
    def follows_alias(self) -> bool:
        return _ALIAS.match(self.uri) is not None

    def refresh(self) -> Switch | None:
        """Load the version the alias points at now if it changed; ``None`` when nothing changed."""
        if not self.follows_alias:
            return None
        version = self._resolve(self.uri)
        old = self.current.version
        if version == old:
            return None
        name = _ALIAS.match(self.uri)["name"]
        candidate = self._load(f"models:/{name}/{version}")
        why = misfit(candidate.spec, self.current.spec, self.symbols)
        if why:
            return Switch(old, version, False, why)
        self.current = candidate
        return Switch(old, version, True, f"@{_ALIAS.match(self.uri)['alias']} moved: version {old} -> {version}")


def misfit(new: ModelSpec, running: ModelSpec, symbols: Sequence[str]) -> str | None:
    """Why ``new`` cannot take over from ``running`` for ``symbols`` (``None``: it can)."""
    if new.timeframe != running.timeframe:
        return f"its timeframe {new.timeframe} is not the running trader's {running.timeframe}; keeping the old model"
    unknown = sorted(set(symbols) - set(new.symbols))
    if unknown:
        return f"it was not trained on {', '.join(unknown)} (traded here); keeping the old model"
    missing = sorted(set(new.table_spec().input_timeframes) - set(running.table_spec().input_timeframes))
    if missing:
        return f"it reads {', '.join(map(str, missing))} candles, which the running trader does not fetch; keeping the old model"
    if not new.rules:
        return "it has no decision rules stored (trained before rules were chosen on validation); keeping the old model"
    return None
