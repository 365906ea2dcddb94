"""The exchange broker keeps true books against a real-behaving exchange (tests/fakes/bybit_trading.py):

- a partial exit keeps the unsold remainder as the position (P&L on what sold only) and keeps exiting it;
  a partial entry opens what filled;
- a fill made in a bar the trader never steps again (a kill after the order was taken, restarted one or three
  closes later) reaches the books: books equal the account;
- coins our own orders bought are adopted, coins we never bought are reported and left alone;
- an outage never raises out of a step: the exit waits, is retried first when the exchange answers;
- a revoked key stops the service with one line.

Each of these failed on the code before issue 20 (the remainder was dropped from the books, the fill of a bar
not redone was never applied, a balance read during an outage raised).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pricelevel.core.secrets import Secrets
from pricelevel.data.config import BybitConfig
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading.bybit import BybitBroker
from pricelevel.trading.exchange import CredentialsRefused
from pricelevel.trading.live import EXECUTION, ExchangeBroker
from pricelevel.trading.state import ORDERS, TRADES, StateStore
from tests.fakes.bybit_server import SLOW_MACHINE_TIMEOUT_S
from tests.fakes.bybit_trading import FakeBybitExchange, TradeFault

BAR = pd.Timestamp("2024-06-01 12:00", tz="UTC")
HOUR = pd.Timedelta(hours=1)
RULES = StrategyRules(threshold=0.5, sl_stop=0.02, tp_stop=0.04, sizing="fraction", fraction=0.2)
OHLC = {"ETHUSDT": (3_000.0, 3_010.0, 2_995.0, 3_000.0)}


class Crash(BaseException):
    """The process dies here (BaseException: nothing in the broker catches it)."""


@pytest.fixture
def fake(httpserver) -> FakeBybitExchange:
    fake = FakeBybitExchange(balances={"USDT": 10_000.0})
    fake.add_instrument("ETHUSDT", "ETH", "USDT", base_precision="0.0001", min_order_qty="0.0001", min_order_amt="1")
    fake.set_price("ETHUSDT", 3_000)
    fake.install(httpserver)
    yield fake
    httpserver.check_handler_errors()


def _broker(fake, httpserver, store: StateStore, timeout_s: float = SLOW_MACHINE_TIMEOUT_S, **options) -> ExchangeBroker:
    """The books under market orders only (``resting_exits=False``; tests/test_resting_exits.py has them on)."""
    options.setdefault("resting_exits", False)
    config = BybitConfig(timeout_s=timeout_s, max_attempts=2, backoff_s=0.0, backoff_max_s=0.0)
    exchange = BybitBroker(config, "testnet", Secrets.from_env({"BYBIT_API_KEY": fake.api_key,
                                                                 "BYBIT_API_SECRET": fake.api_secret}),
                           endpoint=httpserver.url_for("").rstrip("/"), sleep=lambda s: None)
    return ExchangeBroker(exchange, store, ("ETHUSDT",), RULES, sleep=lambda s: None, bar=HOUR, **options)


def _restarted(fake, httpserver, store: StateStore, timeout_s: float = SLOW_MACHINE_TIMEOUT_S, **options
               ) -> ExchangeBroker:
    """A new process: the broker from what the database holds, nothing else."""
    options.setdefault("resting_exits", False)
    with store.transaction() as tx:
        saved = store.get(tx, EXECUTION)
    return ExchangeBroker.from_state(saved, _broker(fake, httpserver, store, timeout_s).exchange, store, ("ETHUSDT",), RULES,
                                     sleep=lambda s: None, bar=HOUR, **options)


def _books(broker: ExchangeBroker) -> float:
    return broker.positions()["ETHUSDT"]["size"] if "ETHUSDT" in broker.positions() else 0.0


def _trades(store: StateStore) -> pd.DataFrame:
    return store.frame(TRADES)


def test_a_partial_exit_keeps_the_remainder_and_keeps_exiting_it(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
    held = _books(broker)
    assert held == pytest.approx(fake.balance("ETH"), rel=1e-9) and held > 0
    cost = broker.positions()["ETHUSDT"]["cost"]

    fake.fill_fraction = 0.4  # every market sell fills 40 %, the rest is cancelled: 0.6 ** 3 stays after 3 tries
    fake.set_price("ETHUSDT", 3_100)
    outcome = broker.on_bar(BAR + HOUR, {"ETHUSDT": (3_000.0, 3_200.0, 2_990.0, 3_100.0)}, {}, {})
    left = _books(broker)
    assert left == pytest.approx(held * 0.6 ** 3, rel=1e-3), "the unsold remainder is the position"
    assert left == pytest.approx(fake.balance("ETH"), rel=1e-9), "books equal the wallet"
    assert broker.positions()["ETHUSDT"]["exiting"] == "take_profit"
    sold = held - left
    assert sum(t.size for t in outcome.closed) == pytest.approx(sold, rel=1e-9)
    # P&L on what sold only: about +3.3 % of the cost of the sold part, less fees; nothing invented for the rest.
    pnl = sum(t.pnl for t in outcome.closed)
    assert pnl == pytest.approx(sold * 3_100 * 0.999 - cost * sold / held, rel=1e-6) and pnl > 0
    assert broker.positions()["ETHUSDT"]["cost"] == pytest.approx(cost * left / held, rel=1e-9)

    fake.fill_fraction = 1.0  # the next step sells the rest whatever the signals say
    outcome = broker.on_bar(BAR + 2 * HOUR, {"ETHUSDT": (3_100.0, 3_100.0, 3_090.0, 3_100.0)}, {}, {})
    assert _books(broker) == 0.0 and fake.balance("ETH") == pytest.approx(0.0, abs=1e-4)
    assert [t.exit_reason for t in outcome.closed] == ["take_profit"]
    trades = _trades(store)
    assert trades["size"].sum() == pytest.approx(held, abs=1e-4), "all sold but dust below the base precision"
    assert trades["pnl"].sum() == pytest.approx(fake.balance("USDT") - 10_000.0, rel=1e-6), \
        "the trades' P&L is the account's"


def test_a_partial_entry_opens_what_filled(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    fake.fill_fraction = 0.5
    outcome = broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
    assert _books(broker) == pytest.approx(fake.balance("ETH"), rel=1e-9)
    assert _books(broker) == pytest.approx(0.2 * 10_000 * 0.5 / 3_000 * 0.999, rel=1e-3)
    assert outcome.fills[0].size == pytest.approx(_books(broker))
    with store.transaction() as tx:
        (row,) = [r for r in store.orders(tx) if r["intent"] == "entry"]
    assert row["status"] == "CANCELLED" and row["filled_qty"] > 0


def test_a_fill_arriving_after_its_answer_is_applied_once(fake, httpserver, tmp_path) -> None:
    """An order partly filled now and the rest later (found at reconciliation): both parts reach the books once."""
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store, polls=1)
    fake.fill_fraction = 0.5
    cancels = []
    broker.exchange.cancel_order = lambda symbol, cid: cancels.append(cid) or (_ for _ in ()).throw(
        __import__("pricelevel.trading.exchange", fromlist=["ExchangeUnavailable"]).ExchangeUnavailable("lost"))
    broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
    first = _books(broker)
    assert cancels and first > 0
    fake.fill_rest()
    again = _restarted(fake, httpserver, store)
    assert again.reconcile(str(BAR), BAR + HOUR) == []
    assert _books(again) == pytest.approx(fake.balance("ETH"), rel=1e-9) and _books(again) > first * 1.9
    assert again.reconcile(str(BAR), BAR + HOUR) == [] and _books(again) == pytest.approx(fake.balance("ETH"), rel=1e-9)


@pytest.mark.parametrize("closes_later", [1, 3])
@pytest.mark.parametrize("intent", ["exit", "entry"])
def test_a_kill_after_the_order_was_taken_restarted_closes_later_books_equal_the_account(
    fake, httpserver, tmp_path, intent: str, closes_later: int
) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    committed = BAR
    if intent == "exit":
        broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
        with store.transaction() as tx:  # the trader committed that bar
            store.put(tx, EXECUTION, broker.to_state())
        committed = BAR + HOUR

    def die(stage: str) -> None:
        if stage == "answered":
            raise Crash

    dying = _restarted(fake, httpserver, store, timeout_s=1.0, checkpoint=die)
    fake.fail_next(TradeFault.lost(stall_s=1.5))  # the exchange takes (and fills) the order, the answer times out
    with pytest.raises(Crash):
        if intent == "exit":
            dying.on_bar(committed, OHLC, {}, {"ETHUSDT": True})
        else:
            dying.on_bar(committed, OHLC, {"ETHUSDT": True}, {})
    assert len(fake.created) == (2 if intent == "exit" else 1)
    # Restarted after later closes: the bar of that order is never stepped again.
    later = committed + closes_later * HOUR
    again = _restarted(fake, httpserver, store)
    assert again.reconcile(str(committed - HOUR), later) == []
    assert _books(again) == pytest.approx(fake.balance("ETH"), rel=1e-9, abs=1e-4), "books equal the account (dust aside)"
    with store.transaction() as tx:
        last = store.orders(tx)[-1]
    assert last["status"] == "FILLED" and "answer lost; found by client id" in last["message"]
    if intent == "exit":
        (trade,) = _trades(store).itertuples()
        assert trade.pnl == pytest.approx(fake.balance("USDT") - 10_000.0, rel=1e-6)
        assert [t.symbol for t in again.take_closed()] == ["ETHUSDT"], "the risk counters see the trade once"
    else:
        assert _books(again) > 0
    outcome = again.on_bar(later, OHLC, {}, {})
    assert len(fake.created) == (2 if intent == "exit" else 1), "nothing was sent twice"
    assert outcome.closed == []


def test_coins_we_bought_are_adopted_and_coins_we_never_bought_are_left_alone(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
    ours = _books(broker)
    fake.set_balance("ETH", ours + 5.0)  # someone deposited 5 ETH
    assert broker.reconcile(str(BAR), BAR + HOUR) == [], "coins that are not ours are no mismatch"
    assert _books(broker) == pytest.approx(ours) and any("never bought" in n and "left alone" in n for n in broker.notes)
    assert broker.reconcile(str(BAR), BAR + HOUR) == [] and broker.notes == [], "said once, not at every check"
    # The books lost our position (as a fill in a bar never stepped would): our own orders' coins are adopted.
    broker.open.clear()
    assert broker.reconcile(str(BAR), BAR + HOUR) == []
    assert _books(broker) == pytest.approx(ours, rel=1e-9) and any("adopted" in n for n in broker.notes)
    # Less in the wallet than in the books: named, and the books follow the wallet.
    fake.set_balance("ETH", ours / 2)
    (problem,) = broker.reconcile(str(BAR), BAR + HOUR)
    assert "less than our position" in problem and _books(broker) == pytest.approx(ours / 2)


def test_an_outage_is_survived_and_the_exit_is_retried_first_when_the_exchange_answers(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
    equity = broker.equity()
    fake.set_outage(503)
    outcome = broker.on_bar(BAR + HOUR, {"ETHUSDT": (3_000.0, 3_200.0, 2_990.0, 3_150.0)}, {}, {})  # take-profit
    assert broker.unavailable and outcome.closed == [] and broker.down_since is not None
    assert outcome.equity == pytest.approx(equity + _books(broker) * 150, rel=1e-6), "valued with the last balance"
    assert broker.positions()["ETHUSDT"]["exiting"] == "take_profit" and broker.pending_exits() == ["ETHUSDT"]
    assert broker.resume_exits(BAR + HOUR + pd.Timedelta(minutes=5), "1") == [] and broker.unavailable
    fake.set_outage(None)
    fake.set_price("ETHUSDT", 3_150)
    (trade,) = broker.resume_exits(BAR + HOUR + pd.Timedelta(minutes=10), "1")
    assert trade.exit_reason == "take_profit" and _books(broker) == 0.0 and not broker.unavailable
    assert broker.exchange_answered() is not None and broker.down_since is None


def test_a_revoked_key_is_no_outage(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    fake.revoke_key()
    with pytest.raises(CredentialsRefused, match="10003"):
        broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})


def test_the_order_row_keeps_its_final_status_and_how_a_lost_answer_was_resolved(fake, httpserver, tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    fake.fail_next(TradeFault.lost())
    broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
    rows = store.frame(ORDERS)
    assert list(rows["status"]) == ["FILLED"] and "answer lost (HTTP 502 (server error)); found by client id" in rows["message"].iloc[0]
    assert not math.isnan(broker.equity())


def test_trader_status_shows_the_account_beside_the_books_and_how_lost_answers_ended(
    fake, httpserver, tmp_path, cli, monkeypatch
) -> None:
    state = f"sqlite:///{tmp_path}/s.db"
    store = StateStore(state)
    broker = _broker(fake, httpserver, store)
    fake.fail_next(TradeFault.lost())
    broker.on_bar(BAR, OHLC, {"ETHUSDT": True}, {})
    with store.transaction() as tx:
        store.put(tx, EXECUTION, broker.to_state())
    fake.set_balance("ETH", fake.balance("ETH") + 1.5)  # a deposit this trader never bought
    monkeypatch.setenv("BYBIT_API_KEY", fake.api_key)
    monkeypatch.setenv("BYBIT_API_SECRET", fake.api_secret)
    sets = ["--set", f"trader.state_url={state}", "--set", f"trader.endpoint={httpserver.url_for('').rstrip('/')}",
            # the outage below is retried max_attempts times: the default backoff (1 s doubling) would wait 31 s
            "--set", "bybit.backoff_s=0.01", "--set", "bybit.backoff_max_s=0.02"]
    code, out, err = cli(*sets, "trader", "status", "--mode", "testnet")
    assert code == 0, err
    text = " ".join(out.split())
    assert "exchange account: ETH" in text and "USDT" in text
    assert "1.5 ETH this trader never bought: left alone" in text
    assert "lost answer" in text and "FILLED (answer lost (HTTP 502 (server error)); found by client id)" in text
    fake.set_outage(503)
    code, out, err = cli(*sets, "trader", "status", "--mode", "testnet")
    assert code == 0 and "exchange account: could not be read" in " ".join(out.split())
