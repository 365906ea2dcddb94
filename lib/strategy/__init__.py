"""Model output to trading intent: the signal rules the backtest and the live trader share."""
