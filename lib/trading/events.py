"""What the trader tells a person, and the small interface it tells it through.

The trader (and the flows, for lifecycle messages) call ``notifier.notify(kind, text)``; a notifier must
return at once and never raise, because a message must never delay a decision or an order. Telegram
(:mod:`pricelevel.telegram`) is one notifier; tests record messages with :class:`RecordingNotifier`.
"""

from __future__ import annotations

from typing import Protocol

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


class Notifier(Protocol):
    def notify(self, kind: str, text: str) -> None:
        """Queue ``text``; return at once, never raise."""
        ...


class NoNotifier:
    """Tells nobody (the default)."""

    def notify(self, kind: str, text: str) -> None:
        pass


class FanOut:
    """Tells every notifier (the console and Telegram, say)."""

    def __init__(self, *notifiers: Notifier) -> None:
        self.notifiers = notifiers

    def notify(self, kind: str, text: str) -> None:
        for notifier in self.notifiers:
            notifier.notify(kind, text)


class RecordingNotifier:
    """Keeps every message, in order (tests, and ``trade --replay --json`` output)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def notify(self, kind: str, text: str) -> None:
        self.messages.append((kind, text))
