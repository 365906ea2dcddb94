"""Chaos run: the real trading service against the fake Bybit exchange, with its clock sped up; prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py --minutes 5 [--speed 360] [--seed 0] [--keep DIR]

Two processes under libfaketime (``apt-get install -y faketime``), both on one fake timeline that starts at the
tiny model's replay period and runs ``--speed`` times faster than real time (x360: a 4h bar in 40 s):

- the exchange: ``python -m tests.fakes.bybit_trading`` (klines of the model's symbols from ``data/sample``,
  spot orders, wallet) on 127.0.0.1, refusing a repeated ``orderLinkId`` only while its first order is open,
  so an order sent twice is taken twice and counted;
- the trader: ``pricelevel trade --mode testnet`` with ``trader.endpoint`` and ``bybit.endpoint`` on the fake,
  ``data.source=bybit``, its own data root and state database, and a champion (tests/fakes/trading_model.py:
  a small seeded LSTM with real rules, registered in a local MLflow store). A supervisor restarts it after
  every exit that we did not ask for (as systemd's ``Restart=on-failure`` would), and counts them as crashes.

Chaos, at random moments drawn from ``--seed``: kill -9 (restarted after a random pause, sometimes across
bar closes), a multi-bar HTTP 503 outage of every endpoint, partial fills (``fill_fraction`` 0.4; some
orders' rest filling a bar later), lost answers (order taken, answer stalled past the client's timeout, or a
bare 502), 10006 storms; then a calm bar and SIGTERM just after a bar's close (mid-bar).

Measured (JSON on stdout; logs and databases in ``--keep DIR`` when given):
- ``orders``: ``orders_taken_twice`` (orderLinkIds the exchange created more than once), entries that no
  committed decision asked for, entries sent twice for one (bar, symbol), ``unknown_orders`` (orders at the
  exchange with no row in the trader's database); a partly filled exit's later sells are one decision;
- ``books_vs_account``: per coin, the trader's position (state database) against the wallet (a difference too
  small to sell on the exchange is ``dust``), the coins no position explains, USDT cash, the equity each side
  reports;
- ``bars``: closes during the run, bars decided, bars decided twice (decisions are unique per (bar, symbol):
  counted as bars whose orders the committed decision does not explain), bars missed;
- ``sigterm``: seconds from SIGTERM to exit, its exit code, whether it landed mid-bar;
- ``kills``, ``restarts``, ``crashes`` (non-zero exits other than our kills, with the last log line of each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fake exchange and the tiny model live in tests/fakes
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
#: A sitecustomize that makes timed lock waits end under libfaketime (see its docstring).
FAKETIME_SITE = ROOT / "tests" / "workers" / "faketime_site"
#: Real seconds between two chaos events at least (a kill right after a restart would test nothing).
MIN_GAP_S = 4.0
BAR = pd.Timedelta(hours=4)
#: Real seconds the fake's HTML control calls may take.
CONTROL_TIMEOUT_S = 5.0


@dataclass
class Timeline:
    """One fake clock shared by every process: ``start`` at real time ``real0``, ``speed`` times faster."""

    start: pd.Timestamp
    real0: float
    speed: float

    def now(self) -> pd.Timestamp:
        return self.start + pd.Timedelta(seconds=(time.time() - self.real0) * self.speed)

    def real_until(self, moment: pd.Timestamp) -> float:
        """Real seconds from now until the fake clock shows ``moment``."""
        return (moment - self.now()).total_seconds() / self.speed

    def env(self) -> dict[str, str]:
        """libfaketime for a child started now: its clock starts where the timeline is, at our speed."""
        return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"@{self.now():%Y-%m-%d %H:%M:%S} x{self.speed:g}",
                "TZ": "UTC", "FAKETIME_DONT_RESET": "1", "PYTHONPATH": str(FAKETIME_SITE)}


@dataclass
class Supervised:
    """The trader's process, restarted after every exit; what happened to each run."""

    command: list[str]
    env: dict[str, str]
    logs: Path
    timeline: Timeline
    process: subprocess.Popen | None = None
    runs: list[dict] = field(default_factory=list)
    expected_exit: bool = False

    def start(self) -> None:
        log = self.logs / f"trader-{len(self.runs) + 1:02d}.log"
        handle = log.open("w")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env={**self.env, **self.timeline.env()}, stdout=handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.runs.append({"log": log.name, "started_fake": str(self.timeline.now()), "pid": self.process.pid})
        self.expected_exit = False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        if self.alive():
            self.expected_exit = True
            os.killpg(self.process.pid, signal.SIGKILL)  # our own child's session, nothing else
            self.process.wait()
            self._ended("kill -9")

    def check(self) -> bool:
        """A run that ended by itself: record it (a crash unless it exited 0); True when it did."""
        if self.process is None or self.process.poll() is None or self.runs[-1].get("ended"):
            return False
        self._ended("crash" if self.process.returncode != 0 else "exit 0")
        return True

    def _ended(self, how: str) -> None:
        run = self.runs[-1]
        run.update(ended=how, code=self.process.returncode, ended_fake=str(self.timeline.now()))
        if how == "crash":
            lines = [ln for ln in (self.logs / run["log"]).read_text(errors="replace").splitlines() if ln.strip()]
            run["last_lines"] = lines[-3:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="real minutes of chaos (start-up not counted)")
    parser.add_argument("--speed", type=float, default=360.0, help="fake seconds per real second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--outage-bars", type=float, default=2.5, help="length of the HTTP 503 outage, in bars")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs, state and fake state in this folder")
    args = parser.parse_args()
    if not LIBFAKETIME.exists():
        sys.exit(f"chaos: {LIBFAKETIME} is missing: apt-get install -y faketime")
    work = Path(tempfile.mkdtemp(prefix="pricelevel-chaos-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []
    try:
        result = run(args, work, children)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2, default=str))


def run(args, work: Path, children: list[subprocess.Popen]) -> dict:
    rng = random.Random(args.seed)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pricelevel.core.runtime import bootstrap

    bootstrap(threads=1)
    from tests.fakes.bybit_trading import FakeBybitExchange, FakeExchangeControl
    from tests.fakes.trading_model import SYMBOLS, register_tiny_model

    # A champion that trades often: entries at the median of its own probabilities, a 2-bar time stop.
    tiny = register_tiny_model(work / "model", quantile=0.5, rules={"max_hold_bars": 2})
    market = work / "market"
    market.mkdir(exist_ok=True)
    for path in (ROOT / "data" / "sample").glob("*.parquet"):
        symbol, _, timeframe = path.stem.rpartition("_")
        if symbol in SYMBOLS and timeframe in ("1h", "4h", "1d"):  # what the model reads (15m starts in 2024)
            shutil.copy(path, market / path.name)

    timeline = Timeline(tiny.replay_start + BAR - pd.Timedelta(minutes=30), time.time(), args.speed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fake_log = (logs / "fake.log").open("w")
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.bybit_trading", "--port", str(port), "--data", str(market),
         "--clock-speed", f"{args.speed:g}", "--weak-link-ids"],
        cwd=ROOT, env={**os.environ, **timeline.env()}, stdout=fake_log, stderr=subprocess.STDOUT, start_new_session=True)
    children.append(fake)
    control = FakeExchangeControl(url, timeout_s=CONTROL_TIMEOUT_S)
    _wait_for(lambda: _answers(control), 60, "the fake exchange did not start")
    key, secret = FakeBybitExchange.api_key, FakeBybitExchange.api_secret
    state_db = work / "state.db"
    sets = {
        "trader.endpoint": url, "bybit.endpoint": url, "data.source": "bybit", "data.root": str(work / "data"),
        "trader.state_url": f"sqlite:///{state_db}", "tracking.tracking_uri": tiny.tracking.tracking_uri,
        "tracking.artifact_location": tiny.tracking.artifact_location,
        # Times that stand for computation or network latency are real: scale them to the fake clock.
        "bybit.timeout_s": 5 * args.speed, "trader.stale_after_s": 15 * args.speed,
        # The fake speaks REST only: candles and fills by REST (the streams have their own tests and bench).
        "trader.market_data": "rest",
    }
    command = [str(ROOT / ".venv" / "bin" / "pricelevel"), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
               "trade", "--mode", "testnet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM", "BYBIT", "PRICELEVEL_"))}
    env.update(BYBIT_API_KEY=key, BYBIT_API_SECRET=secret, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    trader = Supervised(command, env, logs, timeline)
    trader.start()
    children_box = _ChildList(children, trader)

    started = time.time()
    first = _wait_for(lambda: _last_bar(state_db), 240, "the trader decided no bar in 4 minutes", poll=children_box.poll)
    startup_s = time.time() - started
    events: list[dict] = []

    def note(kind: str, **detail) -> None:
        events.append({"real_s": round(time.time() - started, 1), "fake": str(timeline.now().floor("s")), "event": kind,
                       **detail})

    note("first bar decided", bar=first)
    chaos_s = args.minutes * 60
    end = time.time() + chaos_s
    bar_real = BAR.total_seconds() / args.speed
    # The plan: events at random moments of the first 70 % of the window; the rest is calm, then SIGTERM.
    window = 0.7 * chaos_s
    outage_len = args.outage_bars * bar_real
    plan = sorted(
        [(rng.uniform(0.05, 0.6) * window, "kill") for _ in range(args.kills)]
        + [(rng.uniform(0.0, 0.3) * window, "partial"), (rng.uniform(0.3, 0.6) * window, "partial_rest_later"),
           (rng.uniform(0.1, 0.5) * window, "lost"), (rng.uniform(0.1, 0.5) * window, "storm"),
           (rng.uniform(0.2, max(0.21, 1.0 - outage_len / window)) * window, "outage"),
           (rng.uniform(0.2, 0.6) * window, "kill_mid_bar")]
    )
    partial_until = outage_until = last_event = 0.0
    for at, kind in plan:
        while time.time() < max(started + startup_s + at, last_event + MIN_GAP_S):
            children_box.poll()
            time.sleep(0.2)
        now = last_event = time.time()
        if partial_until and now >= partial_until:
            control.fill_fraction(1.0, None)
            note("partial fills off")
            partial_until = 0.0
        if kind == "kill":
            trader.kill9()
            note("kill -9")
            pause = rng.choice([0.5, 3.0, bar_real * 1.1, bar_real * 2.2])
            _sleep(pause, children_box)
            trader.start()
            note("restarted", after_real_s=round(pause, 1))
            last_event = time.time()
        elif kind == "kill_mid_bar":
            close = timeline.now().ceil(BAR)
            _sleep(max(timeline.real_until(close), 0) + 1.0, children_box)  # orders go out just after the close
            trader.kill9()
            note("kill -9 mid-bar", after_close_real_s=1.0)
            _sleep(1.0, children_box)
            trader.start()
            note("restarted")
            last_event = time.time()
        elif kind in ("partial", "partial_rest_later"):
            rest = BAR.total_seconds() if kind == "partial_rest_later" else None
            control.fill_fraction(0.4, rest)
            partial_until = time.time() + 2 * bar_real
            note("partial fills on", fill_fraction=0.4, rest_after_fake_s=rest)
        elif kind == "lost":
            control.faults({"kind": "lost", "stall_s": 2 * 5 * args.speed}, {"kind": "lost"})
            note("lost answers queued", faults=["stalled past the timeout", "bare 502"])
        elif kind == "storm":
            control.faults({"kind": "rate_limit", "count": 12})
            note("10006 storm queued", count=12)
        elif kind == "outage":
            until = timeline.now() + pd.Timedelta(seconds=outage_len * args.speed)
            control.outage(503, until=until)
            outage_until = time.time() + outage_len
            note("HTTP 503 outage", until=str(until.floor("s")), bars=args.outage_bars)
    if partial_until:
        _sleep(max(partial_until - time.time(), 0), children_box)
        control.fill_fraction(1.0, None)
        note("partial fills off")
    if outage_until > time.time():
        _sleep(outage_until - time.time(), children_box)
    control.outage(None)
    # Calm until the end of the window (at least one bar), then SIGTERM one second after a close.
    _sleep(max(end - time.time(), bar_real * 1.2), children_box)
    if not trader.alive():
        trader.start()
        note("restarted for the stop")
        _wait_for(lambda: trader.alive(), 10, "no trader")
        _sleep(bar_real, children_box)
    close = timeline.now().ceil(BAR)
    _sleep(max(timeline.real_until(close), 0) + 1.0, children_box)
    mid_bar = _last_bar(state_db) != str(close - BAR)
    sent = time.time()
    trader.expected_exit = True
    os.killpg(trader.process.pid, signal.SIGTERM)
    try:
        code = trader.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(trader.process.pid, signal.SIGKILL)
        code = trader.process.wait()
    stop_s = time.time() - sent
    trader.runs[-1].update(ended="SIGTERM", code=code, ended_fake=str(timeline.now()))
    note("SIGTERM", seconds_to_exit=round(stop_s, 2), exit_code=code)
    account = control.state()
    (work / "fake_state.json").write_text(json.dumps(account, indent=1))
    fake.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        fake.wait(timeout=10)
    return {
        "speed": args.speed, "seed": args.seed, "minutes": args.minutes, "startup_real_s": round(startup_s, 1),
        "fake_time": {"start": str(timeline.start), "end": str(timeline.now().floor("s"))},
        "sigterm": {"seconds_to_exit": round(stop_s, 2), "exit_code": code, "mid_bar": mid_bar},
        **measure(state_db, account, trader, timeline, SYMBOLS),
        "events": events, "runs": trader.runs, "work": str(work),
    }


class _ChildList:
    """Keeps the supervised trader running: a run that ended by itself is a crash, restarted 2 s later."""

    def __init__(self, children: list[subprocess.Popen], trader: Supervised) -> None:
        self.children, self.trader = children, trader

    def poll(self) -> None:
        if self.trader.process is not None and self.trader.process not in self.children:
            self.children.append(self.trader.process)
        if not self.trader.expected_exit and self.trader.check():
            time.sleep(2.0)
            self.trader.start()
            self.children.append(self.trader.process)


def _sleep(seconds: float, children: _ChildList) -> None:
    until = time.time() + seconds
    while time.time() < until:
        children.poll()
        time.sleep(min(0.2, max(until - time.time(), 0.0)))


def _wait_for(probe, timeout_s: float, message: str, poll=None):
    until = time.time() + timeout_s
    while time.time() < until:
        value = probe()
        if value:
            return value
        if poll is not None:
            poll()
        time.sleep(0.3)
    raise SystemExit(f"chaos: {message}")


def _answers(control) -> bool:
    try:
        control.state()
        return True
    except OSError:
        return False


def _read(state_db: Path, query: str) -> list[tuple]:
    if not state_db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10)) as db:
            return db.execute(query).fetchall()
    except sqlite3.OperationalError:
        return []


def _last_bar(state_db: Path) -> str | None:
    rows = _read(state_db, "select value from kv where key = 'last_bar'")
    return json.loads(rows[0][0]) if rows else None


def measure(state_db: Path, account: dict, trader: Supervised, timeline: Timeline, symbols: tuple[str, ...]) -> dict:
    """The figures: orders taken twice, books against the account, bars decided twice, kills and crashes."""
    created = account["created"]
    taken = Counter(o["orderLinkId"] for o in created)
    rows = {r[0]: {"symbol": r[1], "side": r[2], "intent": r[3], "bar_time": r[4], "status": r[5], "filled": r[6]}
            for r in _read(state_db, "select client_id, symbol, side, intent, bar_time, status, filled_qty from orders")}
    decisions = _read(state_db, "select bar_time, symbol, signal, verdict from decisions")
    decided_bars = sorted({d[0] for d in decisions})
    approved = {(bar, symbol) for bar, symbol, signal, verdict in decisions
                if signal == "entry" and verdict.startswith("approved")}
    # Orders of a bar that its one committed decision does not explain: an entry (Buy) that no approved entry of
    # that (bar, symbol) asked for (made by a run that died before committing, then decided otherwise), two
    # entries for one (bar, symbol), or an entry and an exit of one symbol keyed to the same bar. Several sells
    # of one position (a partly filled exit's remainder) are one decision and are not counted.
    buys: Counter = Counter()
    sides: dict[tuple, set] = {}
    for link_id in taken:
        row = rows.get(link_id)
        if row is None:
            continue
        sides.setdefault((row["bar_time"], row["symbol"]), set()).add(row["side"])
        if row["side"] == "Buy":
            buys[(row["bar_time"], row["symbol"])] += 1
    unasked = sorted(k for k in buys if k not in approved)
    entries_twice = sorted(k for k, n in buys.items() if n > 1)
    both = sorted(k for k, s in sides.items() if len(s) > 1)
    twice_bars = sorted({bar for bar, _symbol in (*unasked, *entries_twice, *both)})
    execution = _read(state_db, "select value from kv where key = 'execution'")
    books = (json.loads(execution[0][0]).get("positions") or {}) if execution else {}
    balances = {coin: float(v) for coin, v in account["balances"].items()}
    coins = {s.removesuffix("USDT"): s for s in symbols}
    per_coin, differences = {}, []
    for coin, symbol in coins.items():
        held = float((books.get(symbol) or {}).get("size", 0.0))
        wallet = balances.get(coin, 0.0)
        price = _last_price(account, symbol)
        diff = wallet - held
        per_coin[coin] = {"books": round(held, 8), "wallet": round(wallet, 8), "difference": round(diff, 8),
                          "difference_usdt": round(diff * price, 4) if price else None}
        lots = account.get("instruments", {}).get(symbol, {})
        step = float(lots.get("basePrecision", 1e-8))
        sellable = math.floor(abs(diff) / step + 1e-9) * step
        dust = sellable < float(lots.get("minOrderQty", 0)) or sellable * (price or 0.0) < float(lots.get("minOrderAmt", 1))
        per_coin[coin]["dust"] = dust  # too little to sell on the exchange (below its lot and order minimums)
        if not dust:
            differences.append(coin)
    unexplained = {c: v for c, v in balances.items() if c != "USDT" and c not in coins and v}
    orphans = {c: per_coin[c]["wallet"] for c in coins if per_coin[c]["books"] == 0 and not per_coin[c]["dust"]
               and per_coin[c]["wallet"] > 0}
    equity = _read(state_db, "select equity, cash from equity order by bar_time desc limit 1")
    account_equity = sum(balances.get(c, 0.0) * (_last_price(account, s) or 0.0) for c, s in coins.items()) \
        + balances.get("USDT", 0.0)
    start, now = timeline.start, timeline.now()
    closes = int((now.floor(BAR) - start.ceil(BAR)) / BAR) + 1 if now >= start.ceil(BAR) else 0
    kills = sum(1 for r in trader.runs if r.get("ended") == "kill -9")
    crashes = [r for r in trader.runs if r.get("ended") == "crash"]
    log_text = "\n".join((trader.logs / r["log"]).read_text(errors="replace") for r in trader.runs)
    return {
        "orders": {
            "create_requests": len(account["create_link_ids"]), "created_at_exchange": len(created),
            "orders_taken_twice": sum(1 for n in taken.values() if n > 1),
            "entries_no_committed_decision_asked_for": [list(k) for k in unasked],
            "entries_sent_twice_for_one_bar": [list(k) for k in entries_twice],
            "unknown_orders": sorted(link for link in taken if link not in rows),
            "refused_as_duplicate": int(account["refusals"].get("170141", 0)),
            "partially_filled_at_exchange": sum(1 for o in account["orders"] if o["orderStatus"].startswith("PartiallyFilled")),
            "rows_by_status": dict(Counter(r["status"] for r in rows.values())),
            "executions": len(account["executions"]),
        },
        "books_vs_account": {
            "coins_differing": differences, "per_coin": per_coin,
            "coins_no_position_explains": {**unexplained, **orphans},
            "usdt": {"books_cash": round(equity[0][1], 4) if equity else None, "wallet": round(balances.get("USDT", 0.0), 4)},
            "equity": {"books": round(equity[0][0], 2) if equity else None, "account": round(account_equity, 2)},
        },
        "bars": {
            "closes_during_run": closes, "decided": len(decided_bars),
            "decided_twice": len(twice_bars), "decided_twice_which": twice_bars,
            "entry_and_exit_keyed_to_one_bar": [list(k) for k in both],
            "missed": max(closes - len(decided_bars), 0),
        },
        "kills": kills, "restarts": len(trader.runs) - 1,
        "crashes": len(crashes), "crash_lines": [r.get("last_lines", [])[-1:] for r in crashes],
        "exchange": {"outage_answers": sum(account["outage_answers"].values()), "requests": account["requests"]},
        "log": {
            "reconciliation_mismatches": log_text.count("RECONCILIATION MISMATCH"),
            "tracebacks": log_text.count("Traceback"),
            "secrets_in_logs": int(FAKE_SECRET_RE.search(log_text) is not None),
        },
    }


FAKE_SECRET_RE = re.compile(r"fake-api-(key|secret)-0001")


def _last_price(account: dict, symbol: str) -> float | None:
    price = account.get("prices", {}).get(symbol)
    return float(price) if price else None


if __name__ == "__main__":
    main()
