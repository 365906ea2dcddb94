"""A challenger and a champion scored for the promotion gate: on the same newest bars and against the same
target, each trading with its own rules, beside the strategy baselines on the same bars with the same costs.

- **Same bars**: the rows both models can score (each needs its own ``seq_len`` of history) from the window's
  start, labelled by the challenger's label.
- **Same target**: the classification scores of both models (and of the no-model classifiers) are computed
  against the challenger's label definition, so the two numbers measure the same thing even when the champion
  was trained on another label. Beside them, each model's direction skill (``direction_auc``: up-first against
  down-first bars by the challenger's label's barriers, :mod:`pricelevel.ml.evaluation`).
- **Own rules**: each model trades with the decision rules frozen in its spec; the level rule with the
  parameters the challenger's training chose on validation; cash and buy-and-hold need none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pricelevel.backtest.baselines import LevelRule, strategy_baselines, volatility_rules_of
from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.trading import TradingScore, probability_matrix, score_result, trade_probabilities
from pricelevel.data.folder import CandleFolder
from pricelevel.inference.scoring import Predict, newest_window, predict_tables, tables_for_spec
from pricelevel.ml.evaluation import baseline_scores, direction_at, metric_value, model_scores
from pricelevel.ml.spec import ModelSpec
from pricelevel.strategy.rules import StrategyRules

KEYS = ["symbol", "timestamp"]


@dataclass(frozen=True)
class Contender:
    """A model to score: how it predicts, its spec (inputs and rules) and its registry version."""

    predict: Predict
    spec: ModelSpec
    version: str | None = None


@dataclass(frozen=True)
class ContenderScore:
    version: str | None
    rules: dict[str, Any]
    #: Against the challenger's target on the common rows (``direction_auc`` included).
    classification: dict[str, float]
    #: The tuned classification metric (e.g. PR-AUC) from ``classification``.
    metric: float
    trading: TradingScore


@dataclass(frozen=True)
class Contest:
    start: pd.Timestamp
    end: pd.Timestamp
    #: Labelled rows both models scored (the classification sample) and bars traded (the trading sample).
    rows: int
    bars: int
    challenger: ContenderScore
    champion: ContenderScore | None
    #: The no-model classifiers' tuned metric on the same rows and target.
    classifier_baselines: dict[str, float]
    #: Cash, buy-and-hold and the level rule on the same bars with the same costs.
    strategy_baselines: dict[str, TradingScore] = field(default_factory=dict)

    def describe(self, metric: str) -> str:
        def line(role: str, score: ContenderScore | None) -> str:
            if score is None:
                return ""
            direction = score.classification.get("direction_auc", float("nan"))
            return (f"{role} v{score.version}: {metric} {score.metric:.4f}, direction AUC {direction:.3f}, "
                    f"sharpe {score.trading.sharpe:.2f}, "
                    f"return {score.trading.total_return:+.2%}, {score.trading.n_trades} trades; ")
        baselines = ", ".join(f"{k} sharpe {v.sharpe:.2f}" for k, v in self.strategy_baselines.items())
        return (f"{self.start:%Y-%m-%d} .. {self.end:%Y-%m-%d}, {self.rows} rows: " + line("challenger", self.challenger)
                + line("champion", self.champion) + baselines)


def score_contest(
    challenger: Contender,
    champion: Contender | None,
    folder: CandleFolder,
    window_days: float,
    tuned_metric: str,
    costs: BacktestConfig,
    sizing: StrategyRules,
) -> Contest:
    """Score both models on the newest ``window_days`` of ``folder`` (never before the challenger's test
    segment), on the same rows, the same target and the same bars."""
    symbols = [s for s in challenger.spec.symbols if folder.has(s, challenger.spec.timeframe)]
    tables = tables_for_spec(folder, challenger.spec, symbols)
    start = newest_window(tables, window_days, pd.Timestamp(challenger.spec.extra["test_start"]))
    scored = {"challenger": predict_tables(challenger.predict, challenger.spec, tables)}
    if champion is not None:
        theirs = tables_for_spec(folder, champion.spec, symbols) if champion.spec.table_spec() != challenger.spec.table_spec() else tables
        scored["champion"] = predict_tables(champion.predict, champion.spec, theirs)
    rows = _common_rows(scored, start)
    if rows.empty:
        raise ValueError(f"no bar from {start} on that both models can score and the challenger's label defines")
    target = rows["target"].to_numpy()
    direction = direction_at(tables, rows, challenger.spec.table_spec().labels)
    candles = pd.concat([t.candles.assign(symbol=s) for s, t in tables.items()], ignore_index=True)
    market = market_from_candles(candles[candles["timestamp"] >= start], timeframe=costs.timeframe)

    def contender(role: str, model: Contender) -> ContenderScore:
        classification = model_scores(target, rows[f"probability_{role}"].to_numpy(), direction)
        mine = scored[role][scored[role]["timestamp"] >= start]
        rules = model.spec.strategy_rules()
        traded = trade_probabilities(market, probability_matrix(market, mine), costs, rules)
        return ContenderScore(model.version, rules.model_dump(), classification, metric_value(classification, tuned_metric),
                              score_result(traded))

    classifiers = baseline_scores(target, rows["near_level"].to_numpy(), float(challenger.spec.extra["train_positive_rate"]),
                                  direction)
    level = LevelRule.model_validate(challenger.spec.extra["level_rule"])
    history = {s: t.history for s, t in tables.items()}
    bars = {s: t.candles for s, t in tables.items()}
    return Contest(
        start=start, end=rows["timestamp"].max(), rows=len(rows), bars=market.n_bars,
        challenger=contender("challenger", challenger),
        champion=contender("champion", champion) if champion is not None else None,
        classifier_baselines={name: metric_value(s, tuned_metric) for name, s in classifiers.items()},
        strategy_baselines=strategy_baselines(market, bars, history, level, costs, sizing,
                                              volatility_rules_of(challenger.spec.extra)),
    )


def _common_rows(scored: Mapping[str, pd.DataFrame], start: pd.Timestamp) -> pd.DataFrame:
    """``symbol, timestamp, target, near_level`` (the challenger's) and each model's probability, on the rows
    every model scored, from ``start`` on, where the challenger's target is defined."""
    base = scored["challenger"]
    rows = base.loc[(base["timestamp"] >= start) & np.isfinite(base["target"]), [*KEYS, "target", "near_level", "probability"]]
    rows = rows.rename(columns={"probability": "probability_challenger"})
    for role, frame in scored.items():
        if role != "challenger":
            rows = rows.merge(frame[[*KEYS, "probability"]].rename(columns={"probability": f"probability_{role}"}), on=KEYS)
    return rows.sort_values(["timestamp", "symbol"], kind="stable").reset_index(drop=True)
