"""Configuration of the trading stage: which model trades where (``trader:``) and under which limits (``risk:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pricelevel.backtest.config import ProtectionsConfig
from pricelevel.core.config import Frozen, HttpUrl, Symbol


class TraderConfig(Frozen):
    """The trading service. Real money only with ``mode: mainnet`` in config AND ``PRICELEVEL_TRADER__LIVE=yes``
    in the environment: anything less refuses to start, with one line saying why."""

    #: ``paper`` (default: the backtest engine's fills, no exchange), Bybit ``testnet``, ``demo`` or ``mainnet``.
    mode: Literal["paper", "testnet", "demo", "mainnet"] = "paper"
    #: The model to trade; ``null`` = ``models:/<tracking.registered_model>@champion``. Paper mode may trade any
    #: alias or version; exchange modes trade ``@champion`` only.
    model: str | None = None
    #: Symbols to trade; ``null`` = the model's.
    symbols: tuple[Symbol, ...] | None = None
    #: Bybit base URL override (a local fake exchange); ``null`` = pybit's URL for the mode.
    endpoint: HttpUrl = None
    #: The trader's state (orders, positions, decisions, risk state): any SQLAlchemy URL; ``null`` = SQLite in
    #: ``<data.root>/trader/<mode>/state.db`` (paper and exchange accounts never share a state).
    state_url: str | None = None
    #: Seconds after a bar's close before its candle is fetched (the exchange needs a moment to close it).
    poll_delay_s: float = Field(5.0, ge=0)
    #: A candle not available this many seconds after its close is stale: no decision on it, the breaker counts it.
    stale_after_s: float = Field(120.0, gt=0)
    #: ``websocket``: closed candles pushed by Bybit's public kline stream, each checked alone and appended,
    #: with REST filling what the stream missed (a disconnect, a gap, a refused candle, a late close); ``rest``:
    #: poll closed candles after each bar close (the ingest path, retries included). ``null`` (the default):
    #: ``websocket`` for the exchange modes, ``rest`` for paper (which has no exchange to listen to).
    market_data: Literal["websocket", "rest"] | None = None
    #: Stream base URL override (a local server, ``ws://127.0.0.1:8766``); ``null`` = pybit's host for the mode
    #: (demo takes public candles from mainnet's stream, testnet from testnet's). ``/v5/public/spot`` is appended.
    stream_endpoint: str | None = None
    #: Exchange modes: each position's take-profit rests at the exchange as a limit sell and its stop-loss as a
    #: conditional sell, so it is protected between closes and while the trader is down; ``false``: exits are
    #: market orders at the closes only.
    resting_exits: bool = True
    #: The environment's confirmation for mainnet (``PRICELEVEL_TRADER__LIVE=yes``); a config file or ``--set``
    #: cannot give it.
    live: bool = False

    @property
    def candles_from(self) -> Literal["websocket", "rest"]:
        """Where candles come from: ``market_data``, or its default for the mode."""
        return self.market_data or ("rest" if self.mode == "paper" else "websocket")


class RiskConfig(ProtectionsConfig):
    """The risk manager's limits (docs/concepts/trader.md "Risk"); each is one small rule, each refusal is recorded with its reason.

    ``max_positions``, ``max_drawdown``, ``daily_loss_limit``, ``cooldown_losses`` and ``cooldown_bars`` (with their
    defaults) are :class:`~pricelevel.backtest.config.ProtectionsConfig`'s: the protections every backtest
    simulates with the functions the trader runs. The drawdown halt survives restarts until re-armed."""

    #: The widest stop-loss a position may have: a model's tighter stop is kept, a missing or wider one becomes this.
    #: ``null`` (the default): the model's own stop, as the promotion gate judged it (docs/concepts/trader.md "Risk": the seed's 2 %).
    max_stop_loss: float | None = Field(None, gt=0, lt=1)
    #: Take-profit for a model whose rules have none (``null``, the default: none; the seed's was 4 %).
    take_profit: float | None = Field(None, gt=0)
    #: Equity lost if a position hits its stop-loss; the position is also capped at ``max_position_fraction``.
    risk_per_trade: float = Field(0.02, gt=0, le=1)
    max_position_fraction: float = Field(0.1, gt=0, le=1)
    #: This many exchange errors or stale bars in a row trip the circuit breaker (entries refused) until
    #: ``breaker_reset_bars`` good bars in a row have passed (live only: a backtest has no exchange).
    breaker_errors: int = Field(3, ge=1)
    breaker_reset_bars: int = Field(6, ge=1)
