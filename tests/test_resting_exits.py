"""Exits that rest on the exchange (issue 21): a position's take-profit and stop-loss wait at the exchange as
conditional orders (tests/fakes/bybit_trading.py triggers and fills them as the last price moves, holds coins as
Bybit spot does), so they protect it between closes and while the trader is down:

- both rest once a position opens, at the rule's prices, for what the wallet holds;
- a take-profit that fills between closes reaches the books at its price; the stop is cancelled;
- a stop that triggers while the trader is stopped is found at start (reconciliation) and the take-profit cancelled;
- a force-exit cancels both before selling at market; the close stays the backstop for a level the exchange did not
  fill.

Each failed on the code before (exits were market orders at the closes only: nothing rested on the exchange).
"""

from __future__ import annotations

import pandas as pd
import pytest

from pricelevel.core.secrets import Secrets
from pricelevel.data.config import BybitConfig
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading.bybit import BybitBroker
from pricelevel.trading.live import EXECUTION, ExchangeBroker
from pricelevel.trading.state import TRADES, StateStore
from tests.fakes.bybit_server import SLOW_MACHINE_TIMEOUT_S
from tests.fakes.bybit_trading import FakeBybitExchange

BAR = pd.Timestamp("2024-06-01 12:00", tz="UTC")
HOUR = pd.Timedelta(hours=1)
RULES = StrategyRules(threshold=0.5, sl_stop=0.02, tp_stop=0.04, sizing="fraction", fraction=0.2)
OHLC = {"ETHUSDT": (3_000.0, 3_010.0, 2_995.0, 3_000.0)}
QUIET = {"ETHUSDT": (3_000.0, 3_010.0, 2_995.0, 3_005.0)}
CLOCK = pd.Timestamp("2024-06-01 13:20", tz="UTC")


@pytest.fixture
def fake(httpserver) -> FakeBybitExchange:
    fake = FakeBybitExchange(balances={"USDT": 10_000.0}, unified_account=True)
    fake.add_instrument("ETHUSDT", "ETH", "USDT", base_precision="0.0001", min_order_qty="0.0001", min_order_amt="1")
    fake.set_price("ETHUSDT", 3_000)
    fake.install(httpserver)
    yield fake
    httpserver.check_handler_errors()


def _exchange(fake, httpserver) -> BybitBroker:
    config = BybitConfig(timeout_s=SLOW_MACHINE_TIMEOUT_S, max_attempts=2, backoff_s=0.0, backoff_max_s=0.0)
    secrets = Secrets.from_env({"BYBIT_API_KEY": fake.api_key, "BYBIT_API_SECRET": fake.api_secret})
    return BybitBroker(config, "testnet", secrets, endpoint=httpserver.url_for("").rstrip("/"), sleep=lambda s: None)


def _broker(fake, httpserver, store: StateStore) -> ExchangeBroker:
    return ExchangeBroker(_exchange(fake, httpserver), store, ("ETHUSDT",), RULES, sleep=lambda s: None, bar=HOUR,
                          clock=lambda: CLOCK)


def _restarted(fake, httpserver, store: StateStore) -> ExchangeBroker:
    with store.transaction() as tx:
        saved = store.get(tx, EXECUTION)
    return ExchangeBroker.from_state(saved, _exchange(fake, httpserver), store, ("ETHUSDT",), RULES,
                                     sleep=lambda s: None, bar=HOUR, clock=lambda: CLOCK)


def _resting(fake: FakeBybitExchange) -> dict[str, dict]:
    """The fake's orders that rest (conditional), by kind: ``take_profit`` (a limit) and ``stop_loss``."""
    orders = fake.snapshot()["orders"]
    return {("take_profit" if o["orderType"] == "Limit" else "stop_loss"): o for o in orders
            if o["orderFilter"] == "StopOrder"}


def _market_sells(fake: FakeBybitExchange) -> list[dict]:
    return [o for o in fake.created if o["side"] == "Sell" and o["orderFilter"] == "Order"]


def _held(broker: ExchangeBroker) -> float:
    return broker.positions().get("ETHUSDT", {}).get("size", 0.0)


def _opened(fake, httpserver, store) -> tuple[ExchangeBroker, float]:
    broker = _broker(fake, httpserver, store)
    broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {}, model_version="1")
    with store.transaction() as tx:  # the trader commits the bar
        store.put(tx, EXECUTION, broker.to_state())
    return broker, _held(broker)


def test_both_exits_rest_at_the_rule_prices_for_what_the_wallet_holds(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker, held = _opened(fake, httpserver, store)
    resting = _resting(fake)
    assert set(resting) == {"take_profit", "stop_loss"}
    tp, sl = resting["take_profit"], resting["stop_loss"]
    assert (tp["orderStatus"], sl["orderStatus"]) == ("Untriggered", "Untriggered")
    assert float(tp["price"]) == float(tp["triggerPrice"]) == pytest.approx(3_120.0), "a limit sell at entry + 4 %"
    assert sl["orderType"] == "Market" and float(sl["triggerPrice"]) == pytest.approx(2_940.0), "entry - 2 %"
    assert float(tp["qty"]) == float(sl["qty"]) == pytest.approx(held, abs=1e-4), "the holding, to the lot size"
    assert broker.watching() and fake.locked("ETH") == 0, "conditional orders hold no coins until triggered"
    broker.on_bar(BAR + HOUR, QUIET, {}, {}, model_version="1")
    assert len(fake.created) == 3, "a quiet bar places nothing more (they rest already)"


def test_a_take_profit_filling_between_closes_reaches_the_books_and_the_stop_is_cancelled(
    fake, httpserver, tmp_path
) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker, held = _opened(fake, httpserver, store)
    fake.trade_through("ETHUSDT", 3_050, 3_090, 3_125)  # between closes: up through the take-profit
    (trade,) = broker.watch_exits(CLOCK, "1")
    assert trade.exit_reason == "take_profit" and trade.exit_price == pytest.approx(3_120.0), "filled at its price"
    assert trade.size == pytest.approx(held, abs=1e-4) and trade.exit_time == CLOCK.floor("h"), "dated by its bar"
    assert _held(broker) == 0.0 and fake.balance("ETH") == pytest.approx(0.0, abs=1e-4), "books equal the wallet"
    assert _resting(fake)["stop_loss"]["orderStatus"] == "Deactivated", "the other exit is cancelled"
    assert _market_sells(fake) == [], "nothing sold at market"
    assert trade.pnl == pytest.approx(fake.balance("USDT") - 10_000.0, rel=1e-6)
    assert not broker.watching()


def test_a_stop_triggered_while_the_trader_is_stopped_is_adopted_at_start(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    _, held = _opened(fake, httpserver, store)
    # The trader is down; the market falls through the stop: the exchange sells at market.
    fake.trade_through("ETHUSDT", 2_980, 2_950, 2_930)
    assert fake.balance("ETH") == pytest.approx(0.0, abs=1e-4)
    again = _restarted(fake, httpserver, store)
    assert again.reconcile(str(BAR), BAR + 3 * HOUR) == [], "no mismatch: the fill explains the wallet"
    (trade,) = again.take_closed()
    assert trade.exit_reason == "stop_loss" and trade.exit_price == pytest.approx(2_930.0)
    assert trade.size == pytest.approx(held, abs=1e-4) and _held(again) == 0.0
    assert _resting(fake)["take_profit"]["orderStatus"] == "Deactivated", "the take-profit is cancelled"
    (row,) = store.frame(TRADES).itertuples()
    assert row.exit_reason == "stop_loss" and row.pnl == pytest.approx(fake.balance("USDT") - 10_000.0, rel=1e-6)
    again.on_bar(BAR + 3 * HOUR, QUIET, {}, {}, model_version="1")
    assert _market_sells(fake) == [] and again.take_closed() == [], "applied once, nothing sold twice"


def test_a_force_exit_cancels_both_before_selling_at_market(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker, held = _opened(fake, httpserver, store)
    fake.set_price("ETHUSDT", 3_050)
    (trade,) = broker.flatten(["ETHUSDT"], CLOCK, "1", "forced")
    assert trade.exit_reason == "forced" and trade.size == pytest.approx(held, abs=1e-4)
    assert {o["orderStatus"] for o in _resting(fake).values()} == {"Deactivated"}
    assert len(_market_sells(fake)) == 1 and fake.balance("ETH") == pytest.approx(0.0, abs=1e-4)
    fake.trade_through("ETHUSDT", 3_200, 2_800)  # nothing left to trigger
    assert fake.balance("ETH") == pytest.approx(0.0, abs=1e-4) and 170131 not in fake.refusals


def test_the_close_is_the_backstop_for_a_level_the_exchange_did_not_fill(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker, held = _opened(fake, httpserver, store)
    # The candle printed a high above the take-profit, but the exchange's last price never got there (another
    # venue's print, a wick between trades): the rule says take-profit at this close, so it is sold at market.
    outcome = broker.on_bar(BAR + HOUR, {"ETHUSDT": (3_000.0, 3_130.0, 2_990.0, 3_000.0)}, {}, {}, model_version="1")
    (trade,) = outcome.closed
    assert trade.exit_reason == "take_profit" and len(_market_sells(fake)) == 1
    assert {o["orderStatus"] for o in _resting(fake).values()} == {"Deactivated"}, "cancelled before selling"
    assert _held(broker) == 0.0 and trade.size == pytest.approx(held, abs=1e-4)


def test_resting_exits_cancelled_by_someone_else_are_placed_again(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker, _ = _opened(fake, httpserver, store)
    first = _resting(fake)
    fake.cancel_all()  # a person cancels every open order in the exchange's app
    broker.on_bar(BAR + HOUR, QUIET, {}, {}, model_version="1")
    again = _resting(fake)
    assert {o["orderStatus"] for o in again.values()} == {"Untriggered"}
    assert {o["orderLinkId"] for o in again.values()}.isdisjoint({o["orderLinkId"] for o in first.values()})
