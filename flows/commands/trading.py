"""`pricelevel trade` (the trading service, or a replay over history) and `pricelevel trader ...` (status and
control of a trader through its state database, whether or not its service is running)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from flows.commands.common import UsageError, console, session, table, timestamp
from flows.commands.research import show_backtest

trader_app = typer.Typer(no_args_is_help=True, help="Status and control of a trader (its state database).")

ModeOption = Annotated[str | None, typer.Option("--mode", help="paper (default) | testnet | demo | mainnet (trader.mode).")]


def _mode_overrides(mode: str | None, model: str | None = None) -> list[str]:
    return [*([f"trader.mode={mode}"] if mode else []), *([f"trader.model={model}"] if model else [])]


def trade(
    ctx: typer.Context,
    mode: ModeOption = None,
    model: Annotated[str | None, typer.Option("--model", help="Model URI (default models:/<name>@champion; "
                                                               "a named version only on paper).")] = None,
    replay: Annotated[Path | None, typer.Option("--replay", help="Replay this folder of SYMBOL_TF.parquet candles "
                                                                 "bar by bar on paper, instead of trading live.")] = None,
    start: Annotated[str | None, typer.Option(help="With --replay: the first bar (UTC).")] = None,
    end: Annotated[str | None, typer.Option(help="With --replay: the last bar (UTC).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="With --replay: write the backtest JSON here.")] = None,
    state: Annotated[str | None, typer.Option("--state", help="With --replay: keep the state in this SQLAlchemy URL "
                                                              "(default: a temporary file).")] = None,
) -> None:
    """Trade the champion each bar as it closes (paper by default; stop with Ctrl-C), or replay history."""
    cfg = session(ctx).config(*_mode_overrides(mode, model))
    if replay is not None:
        if cfg.trader.mode != "paper":
            raise UsageError("a replay trades on paper only (drop --mode / trader.mode)")
        _replay(cfg, replay, timestamp(start), timestamp(end), json_out, state)
        return
    if json_out or start or end or state:
        raise UsageError("--start, --end, --json and --state go with --replay")
    from pricelevel.telegram.trader_service import trade_with_telegram
    from pricelevel.trading.live import StopRequested

    out = console()
    try:
        asyncio.run(trade_with_telegram(cfg, dict(os.environ), lambda text: out.print(text, markup=False)))
    except StopRequested:  # a stop that landed in a retry's backoff: a clean stop all the same
        out.print("stopped", markup=False)
    # Everything is committed and said: end now. A step abandoned mid-call (its order, if any, is resolved by the
    # next start's reconciliation) and the libraries' exit hooks must not hold a stop past systemd's 10 s.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _replay(cfg, folder: Path, start, end, json_out: Path | None, state: str | None) -> None:
    from pricelevel.backtest.metrics import compute_metrics
    from pricelevel.data.folder import CandleFolder
    from pricelevel.trading.events import RecordingNotifier
    from pricelevel.trading.risk import rule_changes_note
    from pricelevel.trading.service import model_uri, open_replay, registry_models, replay_result
    from pricelevel.trading.state import StateStore

    uri = model_uri(cfg.trader, cfg.tracking)
    models = registry_models(cfg.tracking, uri, cfg.trader.symbols)
    with tempfile.TemporaryDirectory(prefix="pricelevel-replay-") as tmp:
        store = StateStore(state or f"sqlite:///{Path(tmp) / 'state.db'}")
        notes = RecordingNotifier()
        run = open_replay(CandleFolder.open(folder), models, store, cfg.backtest, cfg.risk, start, end, notes)
        rules = run.trader.rules
        out = console()
        out.print(f"replaying {uri} (version {models.current.version}) on {folder}: {len(run.bars)} bars from "
                  f"{run.bars[0]:%Y-%m-%d %H:%M}, on paper")
        out.print(f"rules executed (the model's, bounded by risk:): {rules.describe()}")
        note = rule_changes_note(run.trader.spec.strategy_rules(), rules)
        if note:
            out.print(note)
        run.trader.replay(run.bars)
        result = replay_result(run, cfg.backtest)
        store.close()
    metrics = compute_metrics(result)
    show_backtest(f"replay of {uri} on {folder}", result, metrics, json_out, None)
    _print_trades(result.trades)
    sets = " ".join(f"--set backtest.{k}={'null' if v is None else v}" for k, v in rules.model_dump().items())
    out.print(f"the same trades, by the backtest: pricelevel backtest --model {uri} --data {folder} "
              f"--start '{run.bars[0]}' {sets}")
    halts = [text for kind, text in notes.messages if kind in ("risk", "command")]
    if halts:
        out.print("risk: " + " · ".join(halts[:5]) + (f" (+{len(halts) - 5} more)" if len(halts) > 5 else ""))


def _print_trades(trades) -> None:
    rows = ([t.symbol, f"{t.entry_time:%Y-%m-%d %H:%M}", f"{t.exit_time:%Y-%m-%d %H:%M}", f"{t.entry_price:.6g}",
             f"{t.exit_price:.6g}", f"{t.pnl:+,.2f}", t.exit_reason] for t in trades.itertuples())
    console().print(table(f"{len(trades)} trades", ["symbol", "entry", "exit", "entry price", "exit price", "P&L", "exit by"], rows))


# ---------------------------------------------------------------------------------------------- trader ...


def _store(ctx: typer.Context, mode: str | None):
    from pricelevel.trading.service import state_store

    cfg = session(ctx).config(*_mode_overrides(mode))
    return cfg, state_store(cfg.trader, cfg.data.root)


@trader_app.command("status")
def trader_status(
    ctx: typer.Context, mode: ModeOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Mode, model version, equity, positions, open orders and risk state, from the trader's database."""
    from pricelevel.trading.control import status

    cfg, store = _store(ctx, mode)
    current = status(store)
    if cfg.trader.mode != "paper":
        current["account"] = _account(cfg, store)
    if json_out:
        typer.echo(json.dumps(current, indent=2, default=str))
        return
    out = console()
    model = current["model"] or {}
    equity = "-" if current["equity"] is None else f"{current['equity']:,.2f} (cash {current['cash']:,.2f})"
    out.print(f"trader ({current['mode']}, {store.url}): model {model.get('uri', '-')} version {model.get('version', '-')}, "
              f"last bar {current['last_bar'] or '-'}, equity {equity}")
    risk = current["risk"]
    out.print(f"risk: {'KILL SWITCH ON · ' if risk.get('kill_switch') else ''}{risk.get('halted') or 'armed'}"
              f"{' · stopped (no new entries)' if risk.get('stopped') else ''}"
              f"{' · breaker tripped' if risk.get('breaker_tripped') else ''}; refusals {risk.get('refusals') or {}}")
    if current["positions"]:
        rows = ([s, f"{p['size']:.8g}", f"{p['entry_price']:.6g}", f"{p.get('last_close', float('nan')):.6g}"]
                for s, p in current["positions"].items())
        out.print(table("positions", ["symbol", "size", "entry price", "last close"], rows))
    else:
        out.print("positions: none")
    for order in current["open_orders"]:
        out.print(f"open order {order['client_id']} {order['side']} {order['symbol']} {order['status']}: {order['message']}")
    if current["pending_commands"]:
        out.print("queued for the trader: " + ", ".join(c["kind"] for c in current["pending_commands"]))
    out.print(f"{current['trades']} trades closed, realised P&L {current['realised_pnl']:+,.2f}")
    if current["exchange_down_since"]:
        out.print(f"EXCHANGE UNAVAILABLE since {current['exchange_down_since']}: {current['exchange_error']}")
    if current["reconciled_at"]:
        out.print(f"last reconciliation {current['reconciled_at']}: "
                  f"{'; '.join(current['differences']) or 'books equal the account'}")
    for order in current["lost_answers"]:
        out.print(f"lost answer {order['client_id']} {order['side']} {order['symbol']}: {order['status']} ({order['resolution']})")
    account = current.get("account")
    if account is not None:
        if "exchange_error" in account:
            out.print(f"exchange account: could not be read: {account['exchange_error']}")
        else:
            balances = ", ".join(f"{coin} {amount:.8g}" for coin, amount in sorted(account["balances"].items())) or "none"
            out.print(f"exchange account: {balances}; {len(account['open_orders'])} open orders")
            for order in account["open_orders"]:
                out.print(f"  open at the exchange: {order['client_id']} {order['status']} filled {order['filled_qty']:.8g}")
            for difference in account["differences"] or ["books equal the account"]:
                out.print(f"  {difference}")


def _account(cfg, store) -> dict:
    """The exchange account beside the books (an exchange mode; the service need not run)."""
    from pricelevel.core.secrets import MissingSecretError, Secrets
    from pricelevel.trading.bybit import BybitBroker
    from pricelevel.trading.exchange import CredentialsRefused
    from pricelevel.trading.live import account_status

    try:
        exchange = BybitBroker(cfg.bybit, cfg.trader.mode, Secrets.from_env(os.environ), endpoint=cfg.trader.endpoint)
        return account_status(store, exchange)
    except (CredentialsRefused, MissingSecretError, ValueError) as exc:
        return {"exchange_error": str(exc).splitlines()[0]}


def _command(ctx: typer.Context, kind: str, mode: str | None, symbols: tuple[str, ...] = ()) -> None:
    from pricelevel.trading.control import request

    _, store = _store(ctx, mode)
    command = request(store, kind, symbols, by="cli")
    console().print(f"{kind} queued at {command['at']} for the trader of {store.url}; a running service applies it "
                    "within seconds, a stopped one when it starts")


@trader_app.command("kill")
def trader_kill(ctx: typer.Context, mode: ModeOption = None) -> None:
    """The kill switch: flatten every position, cancel open orders, refuse entries until `trader rearm`."""
    _command(ctx, "kill", mode)


@trader_app.command("rearm")
def trader_rearm(ctx: typer.Context, mode: ModeOption = None) -> None:
    """Clear the kill switch, a drawdown or reconciliation halt, a manual stop and the breaker."""
    _command(ctx, "rearm", mode)


@trader_app.command("stop")
def trader_stop(ctx: typer.Context, mode: ModeOption = None) -> None:
    """No new entries (open positions keep their exits) until `trader start`."""
    _command(ctx, "stop", mode)


@trader_app.command("start")
def trader_start(ctx: typer.Context, mode: ModeOption = None) -> None:
    """Allow new entries again after `trader stop`."""
    _command(ctx, "start", mode)


@trader_app.command("forceexit")
def trader_forceexit(
    ctx: typer.Context, symbols: Annotated[list[str] | None, typer.Argument(help="Symbols to close (none: all).")] = None,
    mode: ModeOption = None,
) -> None:
    """Close these positions (all when none is named) at market."""
    _command(ctx, "forceexit", mode, tuple(symbols or ()))


# ---------------------------------------------------------------------------------------------- trader reports
# The same typed answers as Telegram's /daily, /performance, ... (pricelevel.trading.reports), laid out once by
# the answer itself and printed here as a table.

JsonOption = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]


def _show(answer, json_out: bool) -> None:
    """A report answer: its fields as JSON, or its layout (title, table, facts, notes) on the console."""
    import dataclasses

    if json_out:
        typer.echo(json.dumps(dataclasses.asdict(answer), indent=2, default=str))
        return
    report, out = answer.report(), console()
    if report.columns:
        out.print(table(report.title, report.columns, report.rows))
    else:
        out.print(report.title)
        for row in report.rows:
            out.print(" ".join(row), markup=False)
    for label, value in report.facts:
        out.print(f"{label}: {value}", markup=False)
    for note in report.notes:
        out.print(note, markup=False)


def _period(ctx: typer.Context, unit: str, n: int, mode: str | None, json_out: bool) -> None:
    from pricelevel.trading.control import period_profit

    if n < 1:
        raise UsageError("n must be at least 1")
    _, store = _store(ctx, mode)
    _show(period_profit(store, unit, n), json_out)


@trader_app.command("daily")
def trader_daily(ctx: typer.Context, n: Annotated[int, typer.Argument(help="Days.")] = 7, mode: ModeOption = None,
                 json_out: JsonOption = False) -> None:
    """P&L and equity change per UTC day, the last n days (Telegram: /daily)."""
    _period(ctx, "day", n, mode, json_out)


@trader_app.command("weekly")
def trader_weekly(ctx: typer.Context, n: Annotated[int, typer.Argument(help="Weeks.")] = 8, mode: ModeOption = None,
                  json_out: JsonOption = False) -> None:
    """P&L and equity change per week (from Monday), the last n weeks (Telegram: /weekly)."""
    _period(ctx, "week", n, mode, json_out)


@trader_app.command("monthly")
def trader_monthly(ctx: typer.Context, n: Annotated[int, typer.Argument(help="Months.")] = 6, mode: ModeOption = None,
                   json_out: JsonOption = False) -> None:
    """P&L and equity change per month, the last n months (Telegram: /monthly)."""
    _period(ctx, "month", n, mode, json_out)


@trader_app.command("performance")
def trader_performance(ctx: typer.Context, mode: ModeOption = None, json_out: JsonOption = False) -> None:
    """Realised P&L per symbol (Telegram: /performance)."""
    from pricelevel.trading.control import performance

    _, store = _store(ctx, mode)
    _show(performance(store), json_out)


@trader_app.command("stats")
def trader_stats(ctx: typer.Context, mode: ModeOption = None, json_out: JsonOption = False) -> None:
    """Trades per exit reason, wins and losses, how long winners and losers were held (Telegram: /stats)."""
    from pricelevel.trading.control import trade_stats

    _, store = _store(ctx, mode)
    _show(trade_stats(store), json_out)


@trader_app.command("count")
def trader_count(ctx: typer.Context, mode: ModeOption = None, json_out: JsonOption = False) -> None:
    """Positions open and allowed (risk.max_positions) (Telegram: /count)."""
    from pricelevel.trading.control import count

    cfg, store = _store(ctx, mode)
    _show(count(store, cfg.risk), json_out)


@trader_app.command("locks")
def trader_locks(ctx: typer.Context, mode: ModeOption = None, json_out: JsonOption = False) -> None:
    """Halts, stops and cool-downs in force and what ends them (Telegram: /locks)."""
    from pricelevel.trading.control import locks

    cfg, store = _store(ctx, mode)
    _show(locks(store, cfg.risk), json_out)


@trader_app.command("health")
def trader_health(ctx: typer.Context, mode: ModeOption = None, json_out: JsonOption = False) -> None:
    """Last bar processed, the service's heartbeat, the exchange (Telegram: /health)."""
    from pricelevel.trading.control import health

    _, store = _store(ctx, mode)
    _show(health(store), json_out)


@trader_app.command("version")
def trader_version(ctx: typer.Context, mode: ModeOption = None, json_out: JsonOption = False) -> None:
    """pricelevel's and Python's versions and the model the trader runs (Telegram: /version)."""
    from pricelevel.trading.control import versions

    _, store = _store(ctx, mode)
    _show(versions(store), json_out)


@trader_app.command("show-config")
def trader_show_config(ctx: typer.Context, mode: ModeOption = None, json_out: JsonOption = False) -> None:
    """The effective trader, risk, backtest and telegram configuration, secrets masked (Telegram: /show_config)."""
    from pricelevel.trading.reports import config_view

    cfg = session(ctx).config(*_mode_overrides(mode))
    _show(config_view({"trader": cfg.trader, "risk": cfg.risk, "backtest": cfg.backtest, "telegram": cfg.telegram}),
          json_out)
