"""Direction skill (ROC-AUC of up-first against down-first bars) and the rule grid trading a label's own
barriers: hand-computed cases, a volatility-only scorer that has PR-AUC but no direction, and the report."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from pricelevel.backtest.baselines import LevelRule
from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.selection import StrategyContext, rule_grid
from pricelevel.features.config import LabelsConfig
from pricelevel.features.labels import barrier_fractions, direction_classes, targets
from pricelevel.inference.contest import Contender, score_contest
from pricelevel.inference.scoring import predict_tables, tables_for_spec
from pricelevel.ml.dataset import SymbolFrame, SymbolTable
from pricelevel.ml.evaluation import (
    baseline_scores,
    direction_at,
    model_scores,
    scores_table,
    summarize_folds,
    walk_forward_markdown,
)
from pricelevel.ml.metrics import classification_scores, direction_scores
from pricelevel.ml.walkforward import label_exits
from pricelevel.strategy.config import SelectionConfig
from pricelevel.strategy.rules import StrategyRules
from pricelevel.ta.indicators import atr
from tests.conftest import real_candles
from tests.test_scoring import Recorder, scored_setup  # noqa: F401  (a fixture)

RULES = StrategyRules(threshold=0.5)


def test_direction_auc_by_hand() -> None:
    direction = np.array([1, -1, 0, 1, -1, np.nan, 1])
    probability = np.array([0.9, 0.2, 0.99, 0.3, 0.4, 0.0, 0.5])
    # up-first 0.9, 0.3, 0.5 against down-first 0.2, 0.4: 5 of the 6 pairs ordered right (0.3 < 0.4 is not)
    scores = direction_scores(direction, probability)
    assert scores == {"direction_auc": pytest.approx(5 / 6), "direction_rows": 5.0}
    # the timeout (0.99) and the unknown bar are left out: changing them changes nothing
    assert direction_scores(direction, np.r_[probability[:2], 0.0, probability[3:5], 1.0, 0.5]) == scores
    assert direction_scores(np.array([1.0, 1.0, 0.0]), np.array([0.1, 0.2, 0.3]))["direction_auc"] == 0.5  # one class
    assert direction_scores(np.array([1.0, -1.0]), np.array([0.1, np.nan]))["direction_rows"] == 1.0
    with pytest.raises(ValueError, match="equal"):
        direction_scores(np.zeros(3), np.zeros(2))


def test_a_volatility_scorer_has_pr_auc_but_no_direction() -> None:
    """ATR/close ranks the forward-move label well above its base rate and up-first against down-first at
    chance: the failure the direction skill exists to show (issue 22)."""
    frames = [real_candles(s, "4h") for s in ("BTCUSDT", "ETHUSDT", "SOLUSDT")]
    config = LabelsConfig(kind="forward_move", move_frac=0.03, horizon=6)
    target, volatility, direction = [], [], []
    for candles in frames:
        y = targets(candles, np.zeros(len(candles)), config)
        vol = atr(candles["high"], candles["low"], candles["close"], 14) / candles["close"].to_numpy()
        ok = np.isfinite(y) & np.isfinite(vol)
        target.append(y[ok])
        volatility.append(vol[ok])
        direction.append(direction_classes(candles, config)[ok])
    target, volatility, direction = map(np.concatenate, (target, volatility, direction))
    assert classification_scores(target, volatility)["pr_auc"] > target.mean() + 0.1
    assert abs(direction_scores(direction, volatility)["direction_auc"] - 0.5) < 0.03
    # and a scorer that knows the future direction has full direction skill
    assert direction_scores(direction, direction)["direction_auc"] == 1.0


def _table(symbol: str, candles: pd.DataFrame) -> SymbolTable:
    stamps = pd.DatetimeIndex(candles["timestamp"])
    frame = SymbolFrame(symbol, stamps, np.zeros((len(candles), 1), np.float32), np.zeros(len(candles), np.float32))
    return SymbolTable(symbol, candles, None, np.zeros(len(candles), np.int8), frame)  # type: ignore[arg-type]


def test_direction_at_looks_up_each_rows_class_from_its_symbols_candles() -> None:
    candles = {s: real_candles(s, "4h", 800) for s in ("BTCUSDT", "ETHUSDT")}
    tables = {s: _table(s, c) for s, c in candles.items()}
    config = LabelsConfig(kind="triple_barrier", upper=0.02, lower=0.01, horizon=4)
    rows = pd.DataFrame({"symbol": ["ETHUSDT", "BTCUSDT", "ETHUSDT", "BTCUSDT"],
                         "timestamp": [candles["ETHUSDT"]["timestamp"].iloc[i] for i in (10, 0, 799, 0)]})
    rows.loc[1, "timestamp"] = candles["BTCUSDT"]["timestamp"].iloc[500]
    out = direction_at(tables, rows, config)
    eth, btc = direction_classes(candles["ETHUSDT"], config), direction_classes(candles["BTCUSDT"], config)
    np.testing.assert_array_equal(out, [eth[10], btc[500], eth[799], btc[0]])
    assert np.isnan(out[2])  # the last bar: its horizon runs past the data
    with pytest.raises(KeyError):
        direction_at(tables, rows.assign(timestamp=rows["timestamp"] + pd.Timedelta("1min")), config)


def test_baselines_and_models_carry_the_direction_skill() -> None:
    target = np.array([1, 0, 0, 1, 0], float)
    direction = np.array([1, -1, 0, 1, -1], float)
    probability = np.array([0.8, 0.3, 0.5, 0.6, 0.7])
    scores = model_scores(target, probability, direction)
    assert scores["direction_auc"] == pytest.approx(3 / 4) and scores["pr_auc"] == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)
    assert "direction_auc" not in model_scores(target, probability, None)
    baselines = baseline_scores(target, np.array([1, 0, 1, 0, 0]), 0.4, direction)
    assert baselines["majority"]["direction_auc"] == 0.5  # a constant has no direction
    assert baselines["near_level_now"]["direction_auc"] == pytest.approx((1 * 2 + 0.5 * 2) / 4)
    assert "direction_auc" not in baseline_scores(target, np.zeros(5), 0.4)["majority"]


def test_the_rule_grid_trades_the_labels_own_barriers() -> None:
    probability = np.linspace(0.0, 1.0, 101)
    default = SelectionConfig(entry_quantiles=(0.1,))
    assert default.sl_stop == ("down",) and default.tp_stop == ("move",) and default.max_hold_bars == ("horizon",)
    grid = rule_grid(probability, default, RULES, move=0.03, horizon=6, down=0.02)
    assert [(r.tp_stop, r.sl_stop, r.max_hold_bars) for r in grid] == [(0.03, 0.02, 6)]
    # a label without a lower barrier (forward_move): no stop-loss, as before
    assert [(r.tp_stop, r.sl_stop) for r in rule_grid(probability, default, RULES, 0.03, 6)] == [(0.03, None)]
    both = SelectionConfig(entry_quantiles=(0.1,), sl_stop=("down", None, 0.05))
    assert [r.sl_stop for r in rule_grid(probability, both, RULES, 0.03, 6)] == [None, 0.05]  # "down" = None once
    assert [r.sl_stop for r in rule_grid(probability, both, RULES, 0.03, 6, 0.02)] == [0.02, None, 0.05]


def test_label_exits_give_the_grid_u_d_and_the_horizon() -> None:
    candles = real_candles("BTCUSDT", "4h", 1200)
    tables = {"BTCUSDT": _table("BTCUSDT", candles)}
    base = StrategyContext(BacktestConfig(), SelectionConfig(), RULES, move=0.03, horizon=6)
    start, end = candles["timestamp"].iloc[600], candles["timestamp"].iloc[899]
    forward = LabelsConfig(kind="forward_move", move_frac=0.03, horizon=6)
    assert label_exits(base, forward, tables, start, end) == base
    fraction = LabelsConfig(kind="triple_barrier", upper=0.04, lower=0.015, horizon=6)
    exits = label_exits(base, fraction, tables, start, end)
    assert (exits.move, exits.down, exits.horizon) == (0.04, 0.015, 6)
    scaled = LabelsConfig(kind="triple_barrier", barrier_unit="atr", upper=2.0, lower=1.0, horizon=6)
    exits = label_exits(base, scaled, tables, start, end)
    up, down = barrier_fractions(candles, scaled)
    assert exits.move == pytest.approx(np.median(up[600:900])) and exits.down == pytest.approx(np.median(down[600:900]))
    assert exits.move == pytest.approx(2 * exits.down)


def _fold(k: int, auc: float) -> dict[str, object]:
    trading = {name: {"sharpe": 0.5, "sortino": 0.5, "calmar": 0.1, "total_return": 0.01, "max_drawdown": -0.1,
                      "n_trades": 3, "fee_share": 0.2} for name in ("model", "cash", "buy_and_hold", "level_rule")}
    cls = {"model": {"pr_auc": 0.4 + k / 10, "roc_auc": 0.6, "direction_auc": auc, "direction_rows": 100.0},
           "majority": {"pr_auc": 0.3, "roc_auc": 0.5, "direction_auc": 0.5},
           "near_level_now": {"pr_auc": 0.3, "roc_auc": 0.5, "direction_auc": 0.51}}
    return {"fold": k, "test_start": "2024-01-01", "test_end": "2024-02-01", "bars": 10, "trading": trading,
            "classification": cls, "level_rule": {},
            "rules": {"threshold": 0.5, "sl_stop": 0.02, "tp_stop": 0.03, "max_hold_bars": 6}}


def test_the_walk_forward_report_shows_the_direction_skill_beside_pr_auc() -> None:
    folds = [_fold(0, 0.47), _fold(1, 0.55)]
    summary = summarize_folds(folds, "sharpe")
    assert summary["mean"]["model"]["direction_auc"] == pytest.approx(0.51)
    assert summary["worst"]["model"]["direction_auc"] == pytest.approx(0.47)
    assert summary["worst"]["model"]["pr_auc"] == pytest.approx(0.4)
    text = walk_forward_markdown({"metric": "sharpe", "folds": folds, "summary": summary})
    assert "| strategy | PR-AUC | ROC-AUC | direction AUC | Sharpe |" in text
    assert "| model | 0.400 | 0.600 | 0.470 | 0.500 |" in text and "| near level now (classifier) | 0.300 | 0.500 | 0.510 |" in text
    assert "on the 100 test bars where exactly one barrier was touched first" in text
    assert "direction AUC mean 0.510, worst 0.470" in text
    table = scores_table({"test_direction_auc": 0.47, "test_pr_auc": 0.5})
    assert table[0]["direction_auc"] == 0.47 and table[0]["pr_auc"] == 0.5


def test_the_promotion_contest_reports_each_models_direction_skill(scored_setup) -> None:  # noqa: F811
    """Both models' direction AUC on the same rows, by the challenger's label's barriers (the same-target rule)."""
    folder, module, spec, _ = scored_setup
    spec = dataclasses.replace(spec, rules=RULES.model_dump(), extra={
        "test_start": "2021-05-01T00:00:00+00:00", "train_positive_rate": 0.2,
        "level_rule": LevelRule(proximity_atr=0.5, stop_atr=0.25).model_dump()})
    barrier = LabelsConfig(kind="triple_barrier", upper=0.02, lower=0.01, horizon=3)
    challenger = dataclasses.replace(spec, labels=barrier.model_dump(mode="json"))
    predict = Recorder(module)
    contest = score_contest(Contender(predict, challenger, "2"), Contender(predict, spec, "1"), folder, 120, "val_pr_auc",
                            BacktestConfig(), RULES)
    tables = tables_for_spec(folder, challenger, list(challenger.symbols))  # the contest scores the model's symbols
    scored = predict_tables(predict, challenger, tables)
    rows = scored[(scored["timestamp"] >= contest.start) & np.isfinite(scored["target"])]
    expected = direction_scores(direction_at(tables, rows, barrier), rows["probability"].to_numpy())
    assert contest.challenger.classification["direction_auc"] == pytest.approx(expected["direction_auc"])
    assert contest.challenger.classification["direction_rows"] == expected["direction_rows"] > 0
    assert contest.champion.classification["direction_auc"] == contest.challenger.classification["direction_auc"]
    assert "direction AUC" in contest.describe("val_pr_auc")
