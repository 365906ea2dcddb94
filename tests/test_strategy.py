"""A champion must earn it: rules frozen in the model, chosen on validation only; walk-forward folds; the
strategy baselines (cash, buy-and-hold, the level rule); the same-bars same-target contest and the gate."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from pricelevel.backtest.baselines import (
    LevelRule,
    buy_and_hold,
    level_signals,
    strategy_baselines,
    trade_level_rule,
)
from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.selection import aggregate, choose_rules, rule_grid
from pricelevel.backtest.trading import TradingScore, rules_of, score_result, trade_probabilities
from pricelevel.features.config import LabelsConfig
from pricelevel.inference.contest import Contender, score_contest
from pricelevel.inference.scoring import backtest_model, model_rules, predict_tables
from pricelevel.levels.walkforward import LevelHistory
from pricelevel.ml.dataset import SymbolFrame, walk_forward_bounds
from pricelevel.ml.metrics import classification_scores
from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.promotion import Scores, decide
from pricelevel.strategy.config import SelectionConfig
from pricelevel.strategy.rules import StrategyRules
from pricelevel.ta.indicators import atr as wilder_atr
from tests.test_scoring import Recorder, scored_setup  # noqa: F401  (a fixture)

COSTS = BacktestConfig()
RULES = StrategyRules(threshold=0.6, sl_stop=0.02, tp_stop=0.03, max_hold_bars=6)


def _market(n: int = 400, symbols: tuple[str, ...] = ("AAAUSDT", "BBBUSDT"), seed: int = 0, drift: float = 0.0):
    rng = np.random.default_rng(seed)
    frames = []
    for k, symbol in enumerate(symbols):
        close = 100 * np.exp(np.cumsum(rng.normal(drift, 0.01, n)))
        open_ = np.r_[close[0], close[:-1]]
        frames.append(pd.DataFrame({
            "timestamp": pd.date_range("2024-01-01", periods=n, freq="4h", tz="UTC"), "symbol": symbol,
            "open": open_, "high": np.maximum(open_, close) * 1.004, "low": np.minimum(open_, close) * 0.996,
            "close": close, "volume": 1.0 + k,
        }))
    return market_from_candles(pd.concat(frames, ignore_index=True))


# ------------------------------------------------------------------------------------ rules in the model


def test_rules_round_trip_and_validate() -> None:
    assert StrategyRules.model_validate(RULES.model_dump()) == RULES
    with pytest.raises(ValueError, match="sizing=risk needs sl_stop"):
        StrategyRules(threshold=0.5, sizing="risk")
    assert rules_of(BacktestConfig(threshold=0.7)).threshold == 0.7
    assert "enter p >= 0.6000" in RULES.describe() and "time stop 6 bars" in RULES.describe()


def test_a_config_edit_no_longer_changes_a_models_trades(scored_setup) -> None:  # noqa: F811
    """The model trades with the rules in its spec; only an explicit override changes them."""
    folder, module, spec, tables = scored_setup
    predict = Recorder(module)
    median = float(predict_tables(predict, spec, tables)["probability"].median())
    spec = dataclasses.replace(spec, rules=StrategyRules(threshold=median, tp_stop=0.03, max_hold_bars=4).model_dump())
    stored = backtest_model(predict, spec, folder, BacktestConfig(), model_rules(spec))
    edited = backtest_model(predict, spec, folder, BacktestConfig(threshold=0.99, sl_stop=0.2), model_rules(spec))
    pd.testing.assert_frame_equal(stored.result.trades, edited.result.trades)
    assert len(stored.result.trades) > 0 and (stored.result.trades["exit_reason"] == "time_stop").any()
    overridden = backtest_model(predict, spec, folder, BacktestConfig(), model_rules(spec, {"threshold": 0.99}))
    assert overridden.rules.threshold == 0.99 and len(overridden.result.trades) < len(stored.result.trades)


# ------------------------------------------------------------------------------------ choosing on validation


def test_the_rule_grid_turns_entry_shares_into_thresholds_and_label_stops_into_numbers() -> None:
    probability = np.linspace(0.0, 1.0, 101)
    selection = SelectionConfig(entry_quantiles=(0.1, 0.5), sl_stop=(0.02,), tp_stop=("move", None), max_hold_bars=("horizon",))
    grid = rule_grid(probability, selection, RULES, move=0.03, horizon=6)
    assert sorted({r.threshold for r in grid}) == pytest.approx([0.5, 0.9])
    assert {r.tp_stop for r in grid} == {0.03, None} and {r.max_hold_bars for r in grid} == {6}
    assert all(r.sizing == RULES.sizing and r.fraction == RULES.fraction for r in grid)


def test_choosing_rules_picks_the_best_after_costs_and_needs_enough_trades() -> None:
    market = _market(drift=0.002)  # a rising market: entering more often earns more
    rng = np.random.default_rng(1)
    probability = rng.random(market.close.shape)
    selection = SelectionConfig(entry_quantiles=(0.02, 0.3), sl_stop=(None,), tp_stop=(None,), max_hold_bars=(6,), min_trades=5)
    chosen = choose_rules(market, probability, COSTS, selection, RULES.model_copy(update={"sl_stop": None}), 0.03, 6)
    scores = {round(c.choice.threshold, 6): c.score.sharpe for c in chosen.candidates}
    assert chosen.qualified and chosen.score.sharpe == max(scores.values())
    assert chosen.score == score_result(trade_probabilities(market, probability, COSTS, chosen.chosen))  # re-tradeable
    strict = selection.model_copy(update={"min_trades": 10_000})
    unqualified = choose_rules(market, probability, COSTS, strict, RULES.model_copy(update={"sl_stop": None}), 0.03, 6)
    assert not unqualified.qualified and unqualified.value() == -math.inf


def test_aggregate_mean_and_worst_and_a_failed_fold_is_the_worst() -> None:
    assert aggregate([1.0, 3.0], "mean") == 2.0 and aggregate([1.0, 3.0], "worst") == 1.0
    assert aggregate([1.0, math.nan], "mean") == -math.inf and aggregate([], "worst") == -math.inf


# ------------------------------------------------------------------------------------ walk-forward folds


def test_walk_forward_folds_expand_do_not_overlap_and_end_with_the_single_split() -> None:
    n, embargo = 1000, 10
    stamps = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC")
    frames = [SymbolFrame("AAAUSDT", stamps, np.zeros((n, 1), np.float32), np.zeros(n, np.float32))]
    folds = walk_forward_bounds(frames, 0.1, 0.1, embargo, folds=3)
    index = {t: i for i, t in enumerate(stamps)}
    previous_test_end = None
    for k, fold in enumerate(folds):
        train_end, val_start, val_end, test_start = (index[t] for t in (fold.train_end, fold.val_start, fold.val_end, fold.test_start))
        test_end = index[fold.test_end] if fold.test_end is not None else n - 1
        assert val_start - train_end - 1 == embargo and test_start - val_end - 1 == embargo
        assert test_end - test_start + 1 == 100 and val_end - val_start + 1 == 100
        if previous_test_end is not None:
            assert test_start == previous_test_end + 1 and train_end > index[folds[k - 1].train_end]  # expanding
        previous_test_end = test_end
    assert folds[-1].test_end is None and walk_forward_bounds(frames, 0.1, 0.1, embargo)[0] == folds[-1]
    with pytest.raises(ValueError, match="too few"):
        walk_forward_bounds(frames, 0.1, 0.3, embargo, folds=3)


# ------------------------------------------------------------------------------------ strategy baselines


def test_cash_and_buy_and_hold_on_the_same_bars_and_costs() -> None:
    market = _market(n=50)
    cash = TradingScore.cash()
    assert cash.sharpe == 0.0 and cash.n_trades == 0 and cash.total_return == 0.0
    held = buy_and_hold(market, COSTS)
    trades = held.trades
    assert list(trades["exit_reason"]) == ["open", "open"] and trades["entry_bar"].tolist() == [1, 1]  # next open
    # Equal weights (up to the first fill's costs), the same fees and slippage as every strategy.
    assert trades["size"].mul(trades["entry_price"]).tolist() == pytest.approx([5_000.0, 5_000.0], rel=5e-3)
    assert trades["entry_fees"].sum() == pytest.approx(trades["size"].mul(trades["entry_price"]).sum() * COSTS.fees)
    cash = 10_000 - (trades["size"] * trades["entry_price"] + trades["entry_fees"]).sum()
    assert held.equity.iloc[-1] == pytest.approx(cash + (trades["size"] * market.close[-1]).sum(), rel=1e-12)


def test_the_level_rule_enters_near_support_with_its_stops_at_the_levels() -> None:
    n = 60
    stamps = pd.date_range("2024-01-01", periods=n, freq="4h", tz="UTC")
    close = np.full(n, 100.0)
    close[30] = 100.4  # 0.4 above the support: within 0.5 ATR(14) of these bars
    bars = pd.DataFrame({"timestamp": stamps, "open": close, "high": close + 0.5, "low": close - 0.5, "close": close,
                         "volume": 1.0})
    bars.loc[:29, "close"] = 105.0  # far above the support before bar 30
    bars.loc[31:, "close"] = 105.0
    bars.loc[31, "high"] = 112.0  # bar 31 trades up through the resistance
    levels = pd.DataFrame({"asof": [stamps[0], stamps[0]], "price": [100.0, 110.0]})
    history = LevelHistory(refits=pd.DatetimeIndex([stamps[0]]), levels=levels)
    market = market_from_candles(bars.assign(symbol="AAAUSDT"))
    entries, sl, tp = level_signals(market, {"AAAUSDT": bars}, {"AAAUSDT": history}, LevelRule(proximity_atr=0.5, stop_atr=0.25))
    assert np.flatnonzero(entries[:, 0]).tolist() == [30]
    atr = wilder_atr(bars["high"].to_numpy(), bars["low"].to_numpy(), bars["close"].to_numpy(), 14)[30]
    assert sl[30, 0] == pytest.approx((100.4 - (100.0 - 0.25 * atr)) / 100.4)
    assert tp[30, 0] == pytest.approx((110.0 - 100.4) / 100.4)
    scores = strategy_baselines(market, {"AAAUSDT": bars}, {"AAAUSDT": history}, LevelRule(proximity_atr=0.5, stop_atr=0.25),
                                COSTS, RULES)
    assert set(scores) == {"cash", "buy_and_hold", "level_rule"} and scores["level_rule"].n_trades == 1
    trades = trade_level_rule(market, {"AAAUSDT": bars}, {"AAAUSDT": history}, LevelRule(proximity_atr=0.5, stop_atr=0.25),
                              COSTS, RULES).trades
    (trade,) = trades.itertuples()
    # Bar 30's signal fills at bar 31's open (100.0); the take-profit is the resistance's distance from the
    # signal close, applied to that reference price.
    assert (trade.entry_bar, trade.exit_bar, trade.exit_reason) == (31, 31, "take_profit")
    assert trade.exit_price == pytest.approx(100.0 * (1 + tp[30, 0]))


# ------------------------------------------------------------------------------------ the contest and the gate


def test_the_contest_scores_both_models_on_the_same_rows_against_the_challengers_target(scored_setup) -> None:  # noqa: F811
    folder, module, spec, _ = scored_setup
    spec = dataclasses.replace(spec, rules=RULES.model_dump(), extra={
        "test_start": "2021-05-01T00:00:00+00:00", "train_positive_rate": 0.2,
        "level_rule": LevelRule(proximity_atr=0.5, stop_atr=0.25).model_dump()})
    other_label = LabelsConfig(kind="forward_move", move_frac=0.02, horizon=3)
    champion_spec = dataclasses.replace(spec, labels=other_label.model_dump(mode="json"), rules={**RULES.model_dump(), "threshold": 0.4})
    predict = Recorder(module)
    contest = score_contest(Contender(predict, spec, "2"), Contender(predict, champion_spec, "1"), folder, 120, "val_pr_auc",
                            COSTS, RULES)
    # Same rows, the challenger's target: with the same network both classification scores are identical...
    assert contest.champion.classification == contest.challenger.classification
    # ...although the champion's own label differs; trading uses each one's own rules, so the trades differ.
    assert contest.champion.trading != contest.challenger.trading
    assert contest.rows > 0 and set(contest.strategy_baselines) == {"cash", "buy_and_hold", "level_rule"}
    assert contest.start >= pd.Timestamp("2021-05-01", tz="UTC")
    theirs = score_contest(Contender(predict, champion_spec, "1"), None, folder, 120, "val_pr_auc", COSTS, RULES)
    assert theirs.challenger.classification != contest.challenger.classification  # their own label: another number


HURDLE = {"cash": 0.0, "level_rule": 0.5, "buy_and_hold": 1.5}
BASELINES = {"majority": 0.30, "near_level_now": 0.31}


@pytest.mark.parametrize(
    ("challenger", "champion", "hurdle", "promote", "needle"),
    [
        (Scores(0.40, 0.9, BASELINES), None, ("cash", "level_rule"), True, "beats cash 0.00, level_rule 0.50"),
        (Scores(0.40, -0.2, BASELINES), None, ("cash", "level_rule"), False, "does not beat cash"),
        (Scores(0.40, 0.4, BASELINES), None, ("cash", "level_rule"), False, "does not beat level_rule"),
        (Scores(0.40, math.nan, BASELINES), None, ("cash",), False, "does not beat cash"),  # never traded
        (Scores(0.40, 0.9, BASELINES), None, ("cash", "level_rule", "buy_and_hold"), False, "buy_and_hold"),
        # a constant-probability model ties the majority classifier: refused even when its trades cleared the hurdle
        (Scores(0.30, 0.9, BASELINES), None, ("cash", "level_rule"), False, "not > baseline majority"),
        (Scores(0.42, 0.9, BASELINES), Scores(0.40, 0.8, BASELINES), ("cash", "level_rule"), True, "champion"),
        (Scores(0.42, 0.4, BASELINES), Scores(0.40, 0.3, BASELINES), ("cash", "level_rule"), False, "level_rule"),
        (Scores(0.39, 0.9, BASELINES), Scores(0.40, 0.8, BASELINES), ("cash", "level_rule"), False, "is not >"),
    ],
)
def test_the_gate_hurdle_both_ways(challenger, champion, hurdle, promote, needle) -> None:
    decision = decide(challenger, champion, PromotionConfig(hurdle=hurdle), "val_pr_auc", "maximize", "sharpe", HURDLE)
    assert decision.promote is promote and needle in decision.reason, decision.reason
    assert decision.details["hurdle.level_rule"] == 0.5


def test_one_class_windows_score_the_same_for_every_model() -> None:
    target = np.zeros(5)
    assert classification_scores(target, np.linspace(0, 1, 5))["pr_auc"] == classification_scores(target, np.full(5, 0.3))["pr_auc"]
