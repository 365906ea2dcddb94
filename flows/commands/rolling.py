"""``pricelevel research rolling``: the whole retrain -> promote -> trade loop, backtested."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.commands.common import UsageError, console, relative, run_flow, session

research_app = typer.Typer(no_args_is_help=True, help="Research on the whole pipeline.")
QUICK_CONFIG = Path("conf") / "quick.yaml"


@research_app.command("rolling")
def rolling(
    ctx: typer.Context,
    start: Annotated[str, typer.Option(help="First step (UTC).")] = "2023-07-01",
    every: Annotated[str, typer.Option(help="Time between steps: 30d, 60d, 12h ...")] = "60d",
    end: Annotated[str | None, typer.Option(help="Stop the replay here (default: the data's end).")] = None,
    data: Annotated[Path | None, typer.Option(help="Candle folder; default: the validated store, else the bundled sample.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for rolling.json, rolling.html and the work area.")] = Path("data/research/rolling"),
    quick: Annotated[bool, typer.Option("--quick", help="Demo-sized retrains: conf/quick.yaml.")] = False,
    keep_candles: Annotated[bool, typer.Option("--keep-candles", help="Keep each step's cut candle folder.")] = False,
) -> None:
    """At every step: retrain on the candles closed by then, run the promotion gate against the champion,
    trade the champion until the next step; report the chained equity, each decision and the controls, under
    both champion policies (kept until beaten; retired after promotion.retire_after hurdle failures)."""
    import pandas as pd

    from flows.research import research_rolling

    state = session(ctx)
    if quick and state.config_file:
        raise UsageError("--quick is conf/quick.yaml; put your keys in --set or a --config of your own, not both")
    try:
        pd.Timestamp(start), pd.Timedelta(every), end and pd.Timestamp(end)
    except ValueError as exc:
        raise UsageError(f"--start/--every/--end: {exc}") from None
    if quick:
        from pricelevel.core.runtime import project_root

        state = type(state)(project_root() / QUICK_CONFIG, state.overrides, state.debug)
        ctx.find_root().obj = state
    outcome = run_flow(ctx, research_rolling, start=start, every=every, end=end,
                       data=str(data) if data else None, out=str(out), keep_candles=keep_candles)
    console().print(outcome["markdown"])
    console().print(f"json: {relative(outcome['json'])} · page: {relative(outcome['html'])}")
