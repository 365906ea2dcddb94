"""The freqtrade-style commands against the fake Bot API (tests/fakes/telegram_api.py): /daily /weekly /monthly
/performance /stats /count /locks /health /version /show_config /tg_info /logs answered from a trader with known
trades (the numbers worked out by hand in the comments); /forceexit checked against the open positions and
offered as buttons; answered questions edited to their outcome; the "/" menu; silent kinds; HTML escaping; an
HTML 502 outage logged as one WARNING line, with polling back within a second of its end; strangers get nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from pricelevel.telegram import commands
from pricelevel.telegram.outbox import split_message
from pricelevel.telegram.render import report_html
from pricelevel.trading.config import RiskConfig
from pricelevel.trading.reports import Report
from pricelevel.trading.state import StateStore
from tests.fakes.telegram_api import FakeBotAPI, visible
from tests.test_telegram import (
    ALICE,
    DESK,
    EVE,
    STAMP,
    TOKEN,
    ask,
    pending,
    press,
    session,
    tg_config,
    trader_store,
    until,
)


@pytest.fixture
def fake():
    with FakeBotAPI(TOKEN) as api:
        yield api


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return trader_store(tmp_path)


NEW = ("daily", "weekly", "monthly", "performance", "stats", "count", "locks", "health", "version", "show_config",
       "tg_info", "logs")


def test_the_report_commands_answer_from_the_traders_books(fake: FakeBotAPI, store: StateStore,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The store (tests/test_telegram.py): equity 10,000 / 10,050 / 10,020 / 10,110 at 2024-06-01..04 00:00;
    ETHUSDT closed 06-02 (+60, held 1 day, take_profit), SOLUSDT closed 06-04 (-25, held 3 days, stop_loss);
    BTCUSDT open. Here also stopped by /stop and cooling down until 06-05 12:00."""
    with store.transaction() as tx:
        store.put(tx, "risk", {**store.get(tx, "risk"), "stopped": True, "cooldown_until": "2024-06-05 12:00:00+00:00"})

    async def conversation() -> dict[str, str]:
        async with session(fake, store, tg_config(fake), risk=RiskConfig(max_positions=1)):
            logging.getLogger("pricelevel.somewhere").warning("a request to bot%s failed", TOKEN)
            return {text: (await ask(fake, text)).text for text in (
                "/daily 3", "/weekly 2", "/monthly 2", "/performance", "/stats", "/count", "/locks", "/health",
                "/version", "/show_config", "/tg_info", "/logs 3", "/daily 0", "/weekly x")}

    caplog.set_level(logging.INFO)  # as the service logs
    answers = asyncio.run(conversation())
    # Per day: 06-04: SOL -25, equity 10,020 -> 10,110 (+0.90 %); 06-03: no trade, 10,050 -> 10,020 (-0.30 %);
    # 06-02: ETH +60, 10,000 -> 10,050 (+0.50 %).
    assert answers["/daily 3"] == "\n".join([
        "daily P&L to 2024-06-04 00:00 UTC",
        "day        trades    P&L equity %    equity",
        "2024-06-04      1 -25.00   +0.90% 10,110.00",
        "2024-06-03      0  +0.00   -0.30% 10,020.00",
        "2024-06-02      1 +60.00   +0.50% 10,050.00",
        "3 days: 2 trades, P&L +35.00"])
    # Weeks from Monday: 06-03 (SOL -25; 10,050 -> 10,110 = +0.60 %), 05-27 (ETH +60; 10,000 -> 10,050).
    assert answers["/weekly 2"].splitlines()[2:4] == ["2024-06-03      1 -25.00   +0.60% 10,110.00",
                                                       "2024-05-27      1 +60.00   +0.50% 10,050.00"]
    # June: both trades, +35, 10,000 -> 10,110 (+1.10 %); May: nothing recorded.
    assert answers["/monthly 2"].splitlines()[2:4] == ["2024-06      2 +35.00   +1.10% 10,110.00",
                                                        "2024-05      0  +0.00        -         -"]
    assert answers["/performance"] == "\n".join([
        "performance per symbol",
        "symbol  trades won    P&L    mean",
        "ETHUSDT      1 1/1 +60.00 +60.00%",
        "SOLUSDT      1 0/1 -25.00 -25.00%",
        "total P&L +35.00, fees 0.40"])
    assert answers["/stats"].splitlines()[2:] == [
        "stop_loss        1   0    1 -25.00", "take_profit      1   1    0 +60.00",
        "won / lost / even: 1 / 1 / 0 (50% won)", "mean win / loss: +60.00 / -25.00",
        "held: winners / losers: 1d 00:00 / 3d 00:00"]
    assert answers["/count"] == "positions\nopen / allowed: 1 / 1\nopen: BTCUSDT"
    locks = answers["/locks"].splitlines()
    assert locks[0] == "locks" and locks[1].split() == ["lock", "until", "why"]
    assert re.fullmatch(r"stop +/start +/stop: no new entries", locks[2])
    assert re.fullmatch(r"cool-down +2024-06-05 12:00 UTC +losing trades in a row", locks[3])
    assert re.fullmatch(r"max positions +a position closes +1 of 1 open", locks[4])
    health = answers["/health"]
    assert health.startswith("health (paper)\nservice: never started\nlast bar: 2024-06-04 00:00 UTC (")
    assert "commands waiting: 0" in health and re.search(r"telegram: answers; \d+ sent, 0 not sent", health)
    assert re.search(r"^pricelevel: \S+$", answers["/version"], re.M) and "python-telegram-bot: " in answers["/version"]
    assert "model: models:/pricelevel@champion version 2" in answers["/version"]
    assert f"telegram.chat_ids: {ALICE}, {DESK}" in answers["/show_config"]
    assert answers["/tg_info"].splitlines()[:3] == ["this chat", f"chat id: {ALICE}", "chat type: private"]
    logs = answers["/logs 3"].splitlines()
    assert logs[0] == "last 3 log lines" and len(logs) == 4 and TOKEN not in answers["/logs 3"]
    assert any(line.endswith("WARNING pricelevel.somewhere: a request to bot*** failed") for line in logs)
    assert answers["/daily 0"] == "n must be between 0 and 366, got 0" and answers["/weekly x"] == "n must be a number, got 'x'"
    # Reports are HTML: a bold title, the table monospace.
    daily = next(s for s in fake.sent if s.text.startswith("daily P&L"))
    assert daily.parse_mode == "HTML" and daily.html.startswith("<b>daily P&amp;L to 2024-06-04 00:00 UTC</b>\n<pre>")


def two_positions(store: StateStore) -> None:
    with store.transaction() as tx:
        store.put(tx, "execution", {"positions": {
            "BTCUSDT": {"size": 0.01, "entry_price": 50_000.0, "last_close": 51_000.0},
            "ETHUSDT": {"size": 1.0, "entry_price": 3_000.0, "last_close": 2_900.0}}})


def test_forceexit_is_checked_against_the_open_positions_and_offers_them_as_buttons(fake: FakeBotAPI,
                                                                                    store: StateStore) -> None:
    two_positions(store)
    seen: dict[str, object] = {}

    async def conversation() -> None:
        async with session(fake, store, tg_config(fake)):
            seen["unknown"] = (await ask(fake, "/forceexit NEARUSDT")).text  # traded by nobody, no position
            seen["after unknown"] = pending(store)
            question = await ask(fake, "/forceexit")
            seen["question"] = question
            seen["picked"] = await press(fake, question, "ETHUSDT")
            seen["after pick"] = pending(store)
            seen["again"] = await press(fake, question, "BTCUSDT")  # answered already: a notice, nothing queued
            question = await ask(fake, "/forceexit")
            seen["cancelled"] = await press(fake, question, "Cancel")
            question = await ask(fake, "/forceexit")
            seen["all"] = await press(fake, question, "All (2)")
            with store.transaction() as tx:
                store.put(tx, "execution", {"positions": {}})
            seen["none"] = (await ask(fake, "/forceexit")).text
            seen["none all"] = (await ask(fake, "/forceexit all")).text

    asyncio.run(conversation())
    assert seen["unknown"] == "no open position in NEARUSDT: nothing queued (open: BTCUSDT, ETHUSDT)"
    assert seen["after unknown"] == []
    question = seen["question"]
    assert question.text == "Close which position at market?\n(valid 60 s)"
    assert list(question.buttons()) == ["BTCUSDT", "ETHUSDT", "All (2)", "Cancel"]
    assert re.match(f"force-exit ETHUSDT {STAMP}alice\nqueued forceexit ETHUSDT: closes the positions", seen["picked"])
    assert seen["after pick"] == [("forceexit", ["ETHUSDT"], "telegram:alice")]
    assert seen["again"].startswith("That question has expired or was answered already")
    assert re.fullmatch(f"/forceexit: cancelled {STAMP}alice: nothing done.", seen["cancelled"])
    assert re.match(f"force-exit all {STAMP}alice\nqueued forceexit all", seen["all"])
    assert pending(store) == [("forceexit", ["ETHUSDT"], "telegram:alice"), ("forceexit", [], "telegram:alice")]
    assert seen["none"] == seen["none all"] == "no open positions: nothing to close"


def test_strangers_get_nothing_from_any_new_command(fake: FakeBotAPI, store: StateStore) -> None:
    two_positions(store)

    async def conversation() -> None:
        async with session(fake, store, tg_config(fake)):
            question = await ask(fake, "/forceexit")  # Alice's real buttons
            for name in NEW:
                fake.message(EVE, f"/{name}", username="eve")
            fake.message(EVE, "/forceexit", username="eve")
            fake.press(EVE, question.buttons()["BTCUSDT"], username="eve", message_id=question.message_id)
            fake.message(DESK, "/tg_info", user_id=EVE, chat_type="group", username="eve")
            await ask(fake, "/help")  # updates are handled in order: everything before it was handled

    asyncio.run(conversation())
    assert [s.chat_id for s in fake.sent] == [ALICE, ALICE] and fake.edited == [] and fake.notices == []
    assert pending(store) == []


def test_the_command_menu_is_set_at_start(fake: FakeBotAPI, store: StateStore) -> None:
    async def started() -> None:
        async with session(fake, store, tg_config(fake)):
            await until(lambda: bool(fake.menu))

    asyncio.run(started())
    assert fake.menu == [{"command": name, "description": what} for name, what in commands.COMMANDS.items()]
    assert set(NEW) <= {entry["command"] for entry in fake.menu}


def test_silent_kinds_arrive_without_a_sound_and_texts_are_escaped(fake: FakeBotAPI, store: StateStore) -> None:
    async def run() -> None:
        async with session(fake, store, tg_config(fake, chat_ids=(ALICE,), silent=("order", "summary"))) as notifier:
            for kind, text in [("order", "entry BTCUSDT <1 & 2>"), ("risk", "HALTED: drawdown"), ("summary", "day")]:
                notifier.notify(kind, text)
            await until(lambda: len(fake.sent) >= 3)
            await ask(fake, "/status")

    asyncio.run(run())
    assert [(s.text, s.disable_notification) for s in fake.sent[:3]] == [
        ("[order] entry BTCUSDT <1 & 2>", True), ("\u26a0\ufe0f [risk] HALTED: drawdown", False), ("[summary] day", True)]
    assert fake.sent[0].html == "<b>[order]</b> entry BTCUSDT &lt;1 &amp; 2&gt;"
    assert fake.sent[3].disable_notification is False  # an answer always rings
    with pytest.raises(ValueError, match="unknown notification kind nope"):
        tg_config(None, silent=("nope",))


def test_an_html_502_outage_is_one_warning_line_and_commands_answer_within_a_second_of_its_end(
        fake: FakeBotAPI, store: StateStore, caplog: pytest.LogCaptureFixture) -> None:
    """python-telegram-bot logged an ERROR with an 18-line traceback for every HTML answer, and its polling waited
    up to 30 s (growing 1.5 times per failure): 6 s into an outage it sleeps until about 8 s."""

    async def run() -> float:
        async with session(fake, store, tg_config(fake, chat_ids=(ALICE,), reconnect_max_s=0.5)) as notifier:
            fake.down_html = True
            notifier.notify("order", "entry BTCUSDT")
            await asyncio.sleep(6.0)
            assert fake.sent == []
            fake.down_html = False
            started = time.monotonic()
            fake.message(ALICE, "/help")
            await until(lambda: any(s.text.startswith("Commands:") for s in fake.sent), timeout=30)
            return time.monotonic() - started

    caplog.set_level(logging.DEBUG)
    latency = asyncio.run(run())
    assert latency < 2.0
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]  # whoever noticed first (sending or polling) says it once
    assert re.match(r"telegram: cannot reach the Bot API \((sending|polling for commands): HTTP 502 Bad Gateway "
                    r"\(an HTML page, not the Bot API\)\)", loud[0].getMessage())
    assert all(r.exc_info is None and not r.exc_text for r in caplog.records if r.name.startswith(("telegram", "pricelevel")))
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1


def test_html_parts_and_long_reports_stay_valid_html() -> None:
    text = "x" * 4090 + "&amp;" * 4
    parts = split_message(text)
    assert "".join(parts) == text and all(not re.search(r"&[a-z]*$", p) for p in parts)
    long = Report("many", ("symbol", "P&L"), tuple((f"S{k:04d}USDT", f"{k:+.2f}") for k in range(1000)))
    html = report_html(long)
    assert len(html) <= 4096 and re.search(r"<i>\d+ more rows not shown</i>$", html)
    assert re.match(r"many\nsymbol +P&L\nS0000USDT +\+0\.00\n", visible(html, "HTML"))
    assert pd.Timestamp("2024-06-03").weekday() == 0  # the weekly test's Monday


def test_the_cli_prints_the_same_answers(cli, store: StateStore, tmp_path: Path) -> None:
    """``pricelevel trader daily|performance|...`` print the answers Telegram sends (one answer, two layouts)."""
    sets = ["--set", f"trader.state_url={store.url}", "--set", "risk.max_positions=1"]
    code, out, _ = cli("trader", "daily", "3", *sets)
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│ 2024-06")]
    assert [line.replace("│", " ").split() for line in rows] == [
        ["2024-06-04", "1", "-25.00", "+0.90%", "10,110.00"], ["2024-06-03", "0", "+0.00", "-0.30%", "10,020.00"],
        ["2024-06-02", "1", "+60.00", "+0.50%", "10,050.00"]]
    code, out, _ = cli("trader", "performance", "--json", *sets)
    assert code == 0 and [(r["symbol"], r["pnl"]) for r in json.loads(out)["rows"]] == [("ETHUSDT", 60.0), ("SOLUSDT", -25.0)]
    code, out, _ = cli("trader", "count", *sets)
    assert code == 0 and "open / allowed: 1 / 1" in out
    code, out, _ = cli("trader", "locks", *sets)
    assert code == 0 and "max positions" in out
    code, out, _ = cli("trader", "show-config", *sets)
    assert code == 0 and "risk.max_positions: 1" in out and "telegram.enabled: False" in out
