"""What the trader tells a person, and the small interface it tells it through.

A message is a :class:`Notice` (its kind, one of :data:`EVENT_KINDS`, and its text). The trader (and the
flows, for lifecycle messages) call ``notifier.notify(kind, text)``; a notifier must return at once and never
raise, because a message must never delay a decision or an order. Telegram (:mod:`pricelevel.telegram`) is one
notifier; tests record the notices with :class:`RecordingNotifier`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

#: Every kind of message, so configuration can switch each one off.
EVENT_KINDS = (
    "order",      # an order placed, filled or rejected
    "exit",       # a stop-loss, take-profit or time-stop exit
    "risk",       # a refusal worth a person's attention, a halt (drawdown, daily loss, breaker), the kill switch
    "reconcile",  # a reconciliation mismatch with the exchange
    "stale",      # a candle that did not arrive in time
    "model",      # a champion switch (old -> new version) or a refused one
    "command",    # a command applied (stop, start, forceexit, kill, rearm) and by whom
    "summary",    # the daily summary: equity, P&L, trades, open positions
    "promotion",  # a promotion decision of the promote flow, with its numbers
    "pipeline",   # a failed pipeline run
    "service",    # the trading service started, stopped and why, or restarted after an unclean stop
)


class _NoticeFields(NamedTuple):
    kind: str
    text: str


class Notice(_NoticeFields):
    """One message for a person. Its kind must be one of :data:`EVENT_KINDS` (a typo would silently escape every
    filter). A named tuple, so code written for ``(kind, text)`` pairs (unpacking, comparing) keeps working."""

    __slots__ = ()

    def __new__(cls, kind: str, text: str) -> Notice:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown notification kind {kind!r}: one of {', '.join(EVENT_KINDS)}")
        return super().__new__(cls, kind, str(text))


def as_notice(kind: str | Notice, text: str | None = None) -> Notice:
    """The notice of ``notify(kind, text)`` or of ``notify(notice)``."""
    return kind if isinstance(kind, Notice) and text is None else Notice(str(kind), str(text))


class Notifier(Protocol):
    def notify(self, kind: str, text: str) -> None:
        """Queue ``text``; return at once, never raise."""
        ...


class NoNotifier:
    """Tells nobody (the default)."""

    def notify(self, kind: str | Notice, text: str | None = None) -> None:
        pass


class FanOut:
    """Tells every notifier (the console and Telegram, say)."""

    def __init__(self, *notifiers: Notifier) -> None:
        self.notifiers = notifiers

    def notify(self, kind: str | Notice, text: str | None = None) -> None:
        if isinstance(kind, Notice):
            kind, text = kind
        for notifier in self.notifiers:  # as given: each notifier judges the kind (and must not raise)
            notifier.notify(kind, str(text))


class RecordingNotifier:
    """Keeps every message, in order (tests, and ``trade --replay --json`` output)."""

    def __init__(self) -> None:
        self.messages: list[Notice] = []

    def notify(self, kind: str | Notice, text: str | None = None) -> None:
        self.messages.append(as_notice(kind, text))
