"""The levels stage: local extrema, exact 1-D DBSCAN clustering, walk-forward refits and multi-timeframe
filters."""
