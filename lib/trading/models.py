"""Which model trades: ``models:/<name>@champion`` resolved at every bar, hot-swapped between bars when the
alias has moved, provided the new version fits the running trader (same timeframe, every traded symbol
known); otherwise the old one keeps trading and the refusal is reported.

When no version holds the alias any more (the promotion gate retired the champion), the last model stays loaded
to manage the open positions (its exits go on) but no new position is opened (:meth:`ModelProvider.entry_refusal`)
until a version holds the alias again; both changes are said once, as a :class:`Switch`."""

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
    #: ``"none"``: the alias was removed (no new entries until it is back).
    to_version: str
    accepted: bool
    reason: str


#: ``Switch.to_version`` when no version holds the alias.
NO_VERSION = "none"


class ModelProvider:
    """The model behind ``uri``; ``resolve(uri) -> version`` and ``load(name, version) -> model`` are the registry
    edge (injected, so tests and replays can hand in anything with ``predict``, ``spec`` and ``version``).
    ``resolve`` raises :class:`LookupError` when no version holds the alias. ``last_version``: the version this
    trader ran before a restart, loaded (entries off) when the alias is gone at start-up."""

    def __init__(self, uri: str, resolve: Callable[[str], str], load: Callable[[str], object],
                 symbols: Sequence[str] | None = None, last_version: str | None = None) -> None:
        self.uri = uri
        self._resolve, self._load = resolve, load
        self.symbols = tuple(symbols) if symbols else None
        #: No version holds the alias: the loaded model only manages open positions.
        self.alias_missing = False
        self.current = self._first(last_version)
        if self.symbols is None:
            self.symbols = tuple(self.current.spec.symbols)

    def _first(self, last_version: str | None) -> object:
        if not self.follows_alias or last_version is None:
            return self._load(self.uri)
        try:
            return self._load(f"models:/{self._name}/{self._resolve(self.uri)}")
        except LookupError:
            self.alias_missing = True
            return self._load(f"models:/{self._name}/{last_version}")

    @property
    def follows_alias(self) -> bool:
        return _ALIAS.match(self.uri) is not None

    @property
    def _name(self) -> str:
        return _ALIAS.match(self.uri)["name"]

    @property
    def _alias(self) -> str:
        return _ALIAS.match(self.uri)["alias"]

    def entry_refusal(self) -> str | None:
        """Why no position may be opened now (``None``: entries allowed): no version holds the alias."""
        if not self.alias_missing:
            return None
        return f"no version holds @{self._alias} (retired by the promotion gate): no new entries until a model earns it"

    def refresh(self) -> Switch | None:
        """Load the version the alias points at now if it changed; ``None`` when nothing changed. The alias gone
        (or back) is one :class:`Switch`, said once."""
        if not self.follows_alias:
            return None
        old = self.current.version
        try:
            version = self._resolve(self.uri)
        except LookupError:
            if self.alias_missing:
                return None
            self.alias_missing = True
            return Switch(old, NO_VERSION, False, f"@{self._alias} was removed (retired by the promotion gate): no new "
                                                  f"entries until a model earns it; version {old} keeps managing the open "
                                                  "positions (exits go on)")
        if version == old:
            if not self.alias_missing:
                return None
            self.alias_missing = False
            return Switch(old, version, True, f"@{self._alias} is back on version {version}: entries again")
        candidate = self._load(f"models:/{self._name}/{version}")
        why = misfit(candidate.spec, self.current.spec, self.symbols)
        if why:
            return Switch(old, version, False, why)
        self.current, self.alias_missing = candidate, False
        return Switch(old, version, True, f"@{self._alias} moved: version {old} -> {version}")


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
