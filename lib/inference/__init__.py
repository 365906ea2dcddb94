"""Scoring: the one path from any folder of candles to a model's probabilities and trades."""
