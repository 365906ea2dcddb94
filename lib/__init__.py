"""pricelevel: the pure library behind the pipeline (no Prefect imports here).

One subpackage per stage, each importing only the ones listed before it (an import contract checked in CI):

    core       timeframes, candles, secrets, files, locks, the derived-output cache, runtime, services
    ta         technical indicators
    data       candle store and catalogue, sources (sample, Bybit), ingest, validation, publish, status
    levels     support/resistance: extrema, 1-D DBSCAN, walk-forward refits, multi-timeframe filters
    features   feature catalogue, feature columns, labels, feature tables, the look-ahead check
    ml         dataset and windows, model spec, the LSTM, fitting, Optuna tuning, evaluation
    strategy   probabilities to trading signals: the rules the backtest and the trader share
    backtest   the engine, metrics and reports
    inference  scoring: the one path from candles to probabilities and trades
    registry   MLflow tracking, model registry, training runs, promotion
    trading    the live/paper trader (reserved)
    config     composes every stage's config section into one Config

Flows (``flows/``) and tasks (``tasks/``) wire these functions together; everything here takes data and
returns data, with I/O confined to the edges (candle sources, the store, brokers).
"""

__version__ = "0.1.0"
