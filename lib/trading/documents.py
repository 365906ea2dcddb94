"""The trader's state documents, declared: each small JSON document the state database keeps in its ``kv`` table
(the risk state, the execution's books, the command queue, ...) has a typed model and a schema version here, so a
database written by an older pricelevel is read through explicit upgrades instead of ``cls(**raw)``.

A document is stored with its version (the ``kv.version`` column; a row written before versions existed has none
and reads as version 0). Reading one of an older version runs its registered upgrades, one version at a time, then
validates it against the model; a version newer than this code knows is refused with one line. Writing validates
first, so a document this code could not read back is never stored.

To change a document: change its model, bump its ``version`` and register the upgrade from the previous version
(a function of the stored JSON that returns the next version's JSON). ``tests/test_state_schema.py`` checks that
every version has its upgrade and that the models mirror the dataclasses they persist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from pricelevel.backtest.protections import REFUSAL_LABELS, initial_guard
from pricelevel.trading.risk import RiskState

T = TypeVar("T")
#: One upgrade: the stored JSON of version ``n`` in, the JSON of version ``n + 1`` out (pure, no I/O).
Upgrade = Callable[[Any], Any]


class DocumentError(ValueError):
    """A stored document this code cannot read (a newer version, a missing upgrade, a shape that does not validate);
    ``str()`` is one line that says which document and what to do."""


class Declared(BaseModel):
    """Base of the document models: unknown keys are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


def unchanged(raw: Any) -> Any:
    """The upgrade from an unversioned document (version 0) whose shape was already the first declared one."""
    return raw


@dataclass(frozen=True)
class Document(Generic[T]):
    """A declared document: its ``kv`` key, its model (a pydantic model or any type a ``TypeAdapter`` takes), its
    current version and the upgrades ``{from_version: function}`` from every older version."""

    key: str
    model: Any
    version: int
    upgrades: Mapping[int, Upgrade] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [v for v in range(self.version) if v not in self.upgrades]
        if missing:
            raise ValueError(f"document {self.key!r} version {self.version} has no upgrade from version(s) {missing}")

    @cached_property
    def adapter(self) -> TypeAdapter[T]:
        return TypeAdapter(self.model)

    def load(self, raw: Any, stored_version: int | None) -> T:
        """The stored JSON ``raw`` of ``stored_version`` (``None``: written before versions) as the current model."""
        version = stored_version or 0
        if version > self.version:
            raise DocumentError(
                f"state document {self.key!r} is version {version}, written by a newer pricelevel (this one reads up to "
                f"version {self.version}): upgrade pricelevel, or point trader.state_url at another database")
        for step in range(version, self.version):
            try:
                raw = self.upgrades[step](raw)
            except Exception as exc:
                raise DocumentError(f"state document {self.key!r}: the upgrade from version {step} to {step + 1} "
                                    f"failed: {exc!r}") from exc
        return self.validate(raw, f"(stored as version {version})")

    def validate(self, value: Any, where: str = "") -> T:
        """``value`` (the model, or plain data as the callers build it) checked against the model exactly as it
        would read back from the database."""
        data = self.adapter.dump_python(value) if _holds_models(value) else value
        try:
            return self.adapter.validate_python(as_json(data))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'the document'}: {e['msg']}"
                                 for e in exc.errors()[:3])
            raise DocumentError(" ".join(filter(None, [f"state document {self.key!r}", where, "does not match its declared "
                                                       f"model (lib/trading/documents.py): {problems}"]))) from None

    def dump(self, value: Any) -> Any:
        """What is stored: ``value`` validated, as JSON-ready data."""
        return as_json(self.adapter.dump_python(self.validate(value)))


def _holds_models(value: Any) -> bool:
    return isinstance(value, BaseModel) or (isinstance(value, list) and any(isinstance(v, BaseModel) for v in value))


def as_json(value: Any) -> Any:
    """``value`` as it reads back from the database (timestamps as strings, tuples as lists, NaN kept)."""
    return json.loads(json.dumps(value, default=str, allow_nan=True))


# ------------------------------------------------------------------------------------------------ the risk state


class RiskDocument(Declared):
    """:class:`~pricelevel.trading.risk.RiskState`, field for field."""

    peak_equity: float | None = None
    halted: str | None = None
    kill_switch: bool = False
    stopped: bool = False
    day: str | None = None
    day_start_equity: float | None = None
    consecutive_losses: int = 0
    cooldown_until: str | None = None
    breaker_errors: int = 0
    breaker_good: int = 0
    breaker_tripped: bool = False
    refusals: dict[str, int] = {}

    @classmethod
    def from_state(cls, state: RiskState) -> RiskDocument:
        return cls.model_validate(asdict(state))

    def to_state(self) -> RiskState:
        return RiskState(**{f.name: getattr(self, f.name) for f in fields(RiskState)})


# ------------------------------------------------------------------------------------------------ the execution


class EngineDocument(Declared):
    """The paper engine's :class:`~pricelevel.backtest.engine.EngineState`, one list per array (one value per symbol)."""

    cash: list[float]
    position: list[float]
    entry_price: list[float]
    entry_fees: list[float]
    entry_bar: list[int]
    sl_price: list[float]
    tp_price: list[float]
    last_close: list[float]
    pending: list[int]
    stopped_bar: list[int]
    due_bar: list[int]
    pending_sl: list[float]
    pending_tp: list[float]
    rejected: list[int]
    bars_done: int
    #: The protections' state (:mod:`pricelevel.backtest.protections`) and the entries they refused.
    guard_f: list[float]
    guard_i: list[int]
    refused: list[int]


class PaperExecution(Declared):
    """``PaperBroker.to_state()``: the engine's state and the time of every bar it was fed."""

    symbols: list[str]
    engine: EngineDocument
    bar_times: list[str]


class PositionDocument(Declared):
    """One exchange position (``pricelevel.trading.live.Position``)."""

    size: float
    entry_price: float
    entry_time: str
    entry_fees: float
    cost: float
    stop_loss: float
    take_profit: float
    bars_held: int = 0
    last_close: float = float("nan")
    entry_client_id: str = ""
    exiting: str = ""
    #: Base coin bought before fees (the average entry price over several partial fills).
    bought: float = 0.0
    #: The exits resting at the exchange (intent -> client id) and how many times they were placed.
    resting: dict[str, str] = {}
    placed: int = 0


class ClosedTradeDocument(Declared):
    """A closed trade the exchange broker has not handed to the trader yet (``pricelevel.trading.paper.ClosedTrade``)."""

    symbol: str
    entry_time: str
    exit_time: str
    entry_price: float
    exit_price: float
    size: float
    pnl: float
    entry_fees: float
    exit_fees: float
    exit_reason: str
    #: Already told to a person between bars (the next bar hands it to the risk counters only).
    told: bool = False


class ExchangeExecution(Declared):
    """``ExchangeBroker.to_state()``: the positions, and what the broker remembers about the account."""

    symbols: list[str]
    positions: dict[str, PositionDocument]
    exchange: str
    last_cash: float | None = None
    unreported: list[ClosedTradeDocument] = []
    down_since: str | None = None
    last_error: str | None = None
    foreign: dict[str, float] = {}
    #: What the last reconciliation found between the books and the wallet, and when.
    differences: list[str] = []
    reconciled_at: str | None = None


def _execution_v1(raw: Any) -> Any:
    """Version 0 -> 1. The paper engine gained the protections' state (as a new engine starts); exchange positions
    gained ``exiting`` (an exit under way) and the books their memory of the account (nothing remembered)."""
    if not isinstance(raw, dict):
        return raw
    if "engine" in raw:
        guard_f, guard_i = initial_guard()
        engine = {"guard_f": guard_f.tolist(), "guard_i": guard_i.tolist(), "refused": [0] * len(REFUSAL_LABELS),
                  **raw["engine"]}
        return {**raw, "engine": engine}
    positions = {s: {"exiting": "", **p} for s, p in (raw.get("positions") or {}).items()}
    return {"last_cash": None, "unreported": [], "down_since": None, "last_error": None, "foreign": {},
            **raw, "positions": positions}


# ------------------------------------------------------------------------------------------------ the others

#: What ``pricelevel trader`` and Telegram may queue (``pricelevel.trading.control.KINDS``).
COMMAND_KINDS = ("stop", "start", "forceexit", "kill", "rearm")


class Command(Declared):
    kind: Literal["stop", "start", "forceexit", "kill", "rearm"]
    symbols: list[str] = []
    by: str
    at: str


class ModelInUse(Declared):
    uri: str
    version: str


class ServiceMarker(Declared):
    """The service's running marker: written at start, its heartbeat refreshed while it runs, ``running`` false on a
    clean stop. Found ``running`` at the next start, it means the last run ended without a clean stop (a crash, a
    kill -9, a power cut) around ``heartbeat``."""

    running: bool
    pid: int
    host: str
    started: str
    heartbeat: str
    stopped: str | None = None
    #: Why the last run stopped: "SIGTERM", "Ctrl-C (SIGINT)", "error: ...".
    reason: str | None = None


RISK = Document[RiskDocument]("risk", RiskDocument, 1, {0: unchanged})
EXECUTION = Document[PaperExecution | ExchangeExecution]("execution", PaperExecution | ExchangeExecution, 1,
                                                         {0: _execution_v1})
COMMANDS = Document[list[Command]]("commands", list[Command], 1, {0: unchanged})
FORCED_EXITS = Document[list[str]]("forced_exits", list[str], 1, {0: unchanged})
LAST_BAR = Document[str]("last_bar", str, 1, {0: unchanged})
MODEL = Document[ModelInUse]("model", ModelInUse, 1, {0: unchanged})
MODE = Document[str]("mode", Literal["paper", "testnet", "demo", "mainnet"], 1, {0: unchanged})
SERVICE = Document[ServiceMarker]("service", ServiceMarker, 1, {0: unchanged})

#: Every declared document by key: :class:`~pricelevel.trading.state.StateStore` versions and checks these.
DOCUMENTS: Mapping[str, Document[Any]] = {d.key: d for d in (RISK, EXECUTION, COMMANDS, FORCED_EXITS, LAST_BAR, MODEL,
                                                              MODE, SERVICE)}
