"""Backtesting: the engine (exact fill rules), market alignment, metrics, reports. See docs/concepts/backtest.md "Backtest"."""
