"""Foundations every stage uses: timeframes, the candle frame, secrets, safe file writes, inter-process
locks, the derived-output cache, the process runtime and long-running services."""
