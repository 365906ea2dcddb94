"""The live/paper trader (reserved for the trading stage)."""
