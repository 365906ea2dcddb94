"""Backtesting: the engine (exact fill rules), market alignment, metrics, reports. See README "Backtest"."""
