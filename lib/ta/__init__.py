"""Technical indicators (numba kernels, equal to TA-Lib / ta on real candles)."""
