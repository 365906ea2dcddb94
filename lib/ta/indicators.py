"""Technical indicators as pure, vectorised functions: arrays in, float64 arrays of the same length out.

Each function agrees with a reference implementation (checked in ``tests/test_indicators.py`` on the bundled
real candles): TA-Lib 0.8 for :func:`sma`, :func:`ema`, :func:`rsi`, :func:`macd`, :func:`bollinger`,
:func:`cci`, :func:`atr` and :func:`rate_of_change`; the ``ta`` package (0.11) for :func:`ease_of_movement`
and :func:`force_index`; pandas for :func:`log_return` and :func:`rolling_volatility`. The references are test
dependencies only: nothing here imports them.

Contract
--------
- **Inputs**: anything :func:`numpy.asarray` turns into a 1-D float array (ndarray, list, pandas Series;
  the index is ignored). Multi-input indicators need equal lengths. Inputs are never modified.
- **No look-ahead**: the value at row ``t`` depends only on rows ``<= t``. Computing on ``x[:k]`` gives
  exactly (bit for bit) the first ``k`` values of computing on ``x``, so a feature computed on history is
  the one a live system computes when the bar closes.
- **Warm-up**: for finite inputs, exactly the first :func:`lookback` rows are NaN, nothing else is filled
  (no zeros, no back-fill). An input shorter than that gives all NaN, of the input's length.
- **Leading NaN in the input** (e.g. the warm-up of another indicator, as in ``ema(rsi(close), 9)``) are
  skipped, as TA-Lib's Python wrapper does: the indicator starts at the first row where every input is
  non-NaN, and its warm-up counts from there.
- **Non-finite values after that** follow IEEE arithmetic and are never hidden: a windowed indicator (SMA,
  Bollinger, CCI, ROC, Ease of Movement, volatility) is NaN or +-inf exactly on the rows whose window holds
  the bad value and recovers after it; a recursive one (EMA, MACD, RSI, ATR, Force Index) stays NaN from
  that row on. (TA-Lib's running sums instead stay NaN forever after one NaN; pandas' EWM skips NaN; these
  differences only show on non-finite data.) Zero volume in :func:`ease_of_movement` gives inf or NaN (0/0)
  on purpose: the caller decides what a bar without trades means.
- **Windows** are integers >= 1 (>= 2 where one value does not define the quantity: CCI, volatility; and
  MACD needs ``fast < slow``); anything else raises ``ValueError``. TA-Lib refuses 1 for RSI, BBANDS and
  MACD's fast EMA; here those formulas are simply evaluated with 1.

Kept from TA-Lib on purpose, odd as they are (so values match the reference to rounding):

- :func:`macd` seeds the fast EMA at the slow EMA's first row with the mean of the last ``fast`` prices
  there, so both EMAs start on the same row; the first ``slow - fast`` prices never enter the fast EMA.
- :func:`rsi` is 0 on a window without any price change (TA-Lib 0.8.x; later TA-Lib answers 50).
- :func:`cci` is 0 on a window that is flat to ~1e-14 of its price level (TA-Lib's scale-aware test).
- :func:`rate_of_change` is 0 (not inf) when the price ``window`` bars ago is exactly 0.

Resumable forms (``*_resume``, ``*_state``) continue an indicator over rows appended to its input from the
state it had before them, with the same compiled loop, so a live system extends a series bar by bar and gets
the values a recomputation over the whole series gives, to the bit (they are not indicators of their own: no
``lookback`` entry).

The recursions and rolling windows are numba-compiled loops (cached on disk, like the backtest engine), O(n)
except :func:`cci`, whose mean absolute deviation needs every value of every window (O(n * window), as in
TA-Lib). Rolling sums are compensated and rolling deviations restart from an exact two-pass sum, so
neither drifts over long series (TA-Lib's running E[x^2] - mean^2 is ~100x less accurate).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
from numba import njit

__all__ = [
    "MACD",
    "Bollinger",
    "atr",
    "atr_resume",
    "bollinger",
    "bollinger_resume",
    "cci",
    "ease_of_movement",
    "ease_of_movement_resume",
    "ease_of_movement_state",
    "ema",
    "ema_resume",
    "force_index",
    "force_index_resume",
    "log_return",
    "lookback",
    "macd",
    "macd_resume",
    "macd_state",
    "rate_of_change",
    "rolling_volatility",
    "rolling_volatility_resume",
    "rsi",
    "rsi_resume",
    "rsi_state",
    "sma",
    "sma_resume",
    "sma_state",
]

_CCI_CONSTANT = 0.015  # Lambert's scale: ~70-80% of CCI values fall within +-100
_EMV_SCALE = 1e8  # ta's scale factor for Ease of Movement (volume is large next to price moves)
_FLAT_TOLERANCE = 1e-14  # TA-Lib's TA_EPSILON, relative to the window's price level


class MACD(NamedTuple):
    macd: np.ndarray
    signal: np.ndarray
    histogram: np.ndarray


class Bollinger(NamedTuple):
    middle: np.ndarray
    upper: np.ndarray
    lower: np.ndarray


# --------------------------------------------------------------------------------------------------------
# Compiled kernels. Each takes contiguous float64 arrays whose first row is already valid, returns a new
# array of the same length with NaN where it is not yet defined, and runs strictly forward in time.
# --------------------------------------------------------------------------------------------------------


@njit(cache=True)
def _window_update(x, sign, total, compensation, nan_count, pos_inf_count, neg_inf_count):
    """Add (sign 1) or remove (sign -1) one value of a rolling window sum.

    Finite values go into a Neumaier-compensated sum, so a long run of additions and removals does not drift;
    NaN and infinities are only counted (subtracting an infinity back out would poison the sum forever).
    """
    if np.isnan(x):
        nan_count += sign
    elif x == np.inf:
        pos_inf_count += sign
    elif x == -np.inf:
        neg_inf_count += sign
    else:
        value = sign * x
        new_total = total + value
        if abs(total) >= abs(value):
            compensation += (total - new_total) + value
        else:
            compensation += (value - new_total) + total
        total = new_total
    return total, compensation, nan_count, pos_inf_count, neg_inf_count


@njit(cache=True)
def _rolling_sum(values, window):
    """Sum of the last ``window`` values, O(n). A window holding a non-finite value gets the IEEE sum of its
    values (NaN if it holds a NaN or both infinities, else that infinity); the next windows recover."""
    return _rolling_sum_run(values, window, 0, (0.0, 0.0, 0, 0, 0))[0]


@njit(cache=True)
def _rolling_sum_run(values, window, begin, state):
    """:func:`_rolling_sum` of rows ``begin..`` from the window ``state`` after row ``begin - 1`` (total,
    compensation, NaN / +inf / -inf counts): those rows' sums (NaN before ``window - 1``) and the last state."""
    n = values.size
    out = np.full(max(n - begin, 0), np.nan)
    for i in range(begin, n):
        state = _window_update(values[i], 1, *state)
        if i >= window:
            state = _window_update(values[i - window], -1, *state)
        if i >= window - 1:
            total, compensation, nan_count, pos_inf_count, neg_inf_count = state
            if nan_count > 0 or (pos_inf_count > 0 and neg_inf_count > 0):
                out[i - begin] = np.nan
            elif pos_inf_count > 0:
                out[i - begin] = np.inf
            elif neg_inf_count > 0:
                out[i - begin] = -np.inf
            else:
                out[i - begin] = total + compensation
    return out, state


@njit(cache=True)
def _ema_from(values, seed_window, alpha, first):
    """EMA defined from row ``first``, seeded there with the mean of the ``seed_window`` values ending there.

    TA-Lib's seed (``seed_window`` = the EMA's window) and pandas' ``adjust=False`` seed (``seed_window`` = 1,
    the value itself) are both this; the recursion is TA-Lib's ``(x - prev) * alpha + prev``.
    """
    n = values.size
    out = np.full(n, np.nan)
    if first >= n:
        return out
    total = 0.0
    for i in range(first - seed_window + 1, first + 1):
        total += values[i]
    state = total / seed_window
    out[first] = state
    out[first + 1 :] = _ema_run(values, alpha, first + 1, state)
    return out


@njit(cache=True)
def _ema_run(values, alpha, begin, state):
    """The EMA recursion over rows ``begin..`` from ``state``, the EMA at row ``begin - 1``."""
    out = np.empty(max(values.size - begin, 0))
    for i in range(begin, values.size):
        state = (values[i] - state) * alpha + state
        out[i - begin] = state
    return out


@njit(cache=True)
def _wilder_step(average, value, window):
    """Wilder's smoothing, in TA-Lib's arithmetic."""
    return (average * (window - 1) + value) / window


@njit(cache=True)
def _rsi(close, window):
    """TA-Lib's RSI: Wilder averages of gains and losses, seeded with their means over the first ``window``
    changes. The loss is ``gain - change``, so a NaN change leaves the loss NaN for good."""
    out = np.full(close.size, np.nan)
    if close.size > 1:
        out[1:] = _rsi_run(close, window, 1, 0.0, 0.0)[0]
    return out


@njit(cache=True)
def _rsi_run(close, window, begin, average_gain, average_loss):
    """:func:`_rsi` of rows ``begin..`` (``begin >= 1``) from the averages after row ``begin - 1`` (during the
    first ``window`` changes: their running sums): those rows' values and the last averages."""
    n = close.size
    out = np.full(max(n - begin, 0), np.nan)
    for i in range(begin, n):
        change = close[i] - close[i - 1]
        gain = change if change > 0.0 else 0.0
        loss = gain - change
        if i <= window:
            average_gain += gain
            average_loss += loss
            if i < window:
                continue
            average_gain /= window
            average_loss /= window
        else:
            average_gain = _wilder_step(average_gain, gain, window)
            average_loss = _wilder_step(average_loss, loss, window)
        moved = average_gain + average_loss
        out[i - begin] = 0.0 if moved == 0.0 else 100.0 * (average_gain / moved)
    return out, average_gain, average_loss


@njit(cache=True)
def _nan_max(a, b):
    """``max`` that returns NaN if either side is NaN (a plain comparison would drop it)."""
    return a if (a >= b or np.isnan(a)) else b


@njit(cache=True)
def _atr(high, low, close, window):
    """TA-Lib's ATR: the true range from row 1, its mean over the first ``window`` of them, then Wilder."""
    out = np.full(close.size, np.nan)
    if close.size > 1:
        out[1:] = _atr_run(high, low, close, window, 1, 0.0)[0]
    return out


@njit(cache=True)
def _atr_run(high, low, close, window, begin, average):
    """:func:`_atr` of rows ``begin..`` (``begin >= 1``) from the average after row ``begin - 1`` (during the
    first ``window`` true ranges: their running sum): those rows' values and the last average."""
    n = close.size
    out = np.full(max(n - begin, 0), np.nan)
    for i in range(begin, n):
        previous_close = close[i - 1]
        true_range = _nan_max(
            high[i] - low[i], _nan_max(abs(previous_close - high[i]), abs(previous_close - low[i]))
        )
        if i <= window:
            average += true_range
            if i < window:
                continue
            average /= window
        else:
            average = _wilder_step(average, true_range, window)
        out[i - begin] = average
    return out, average


@njit(cache=True)
def _exact_mean_and_squares(values, start, end, origin):
    """Mean (measured from ``origin``) and sum of squared deviations of ``values[start:end + 1]``, by a
    corrected two-pass sum: no E[x^2] - mean^2 cancellation, and the ``(sum d)^2 / w`` term cancels the
    rounding left in the mean."""
    count = end - start + 1
    total = 0.0
    for i in range(start, end + 1):
        total += values[i] - origin
    mean = total / count
    squares = 0.0
    deviations = 0.0
    for i in range(start, end + 1):
        deviation = (values[i] - origin) - mean
        squares += deviation * deviation
        deviations += deviation
    return mean, squares - deviations * deviations / count


@njit(cache=True)
def _rolling_std(values, window, ddof):
    """Standard deviation of each window, O(n): Welford's update as one value enters and one leaves.

    Values are measured from an origin inside the window, so the running mean's rounding is relative to the
    deviations, not to the price level. The update's rounding is relative to the largest sum of squares seen
    since the last exact (two-pass) restart, so it restarts every ``window`` rows, whenever the sum of
    squares has fallen below 1e-3 of that peak (a calm window after a volatile one), and once a non-finite
    value (NaN for the windows holding it) has left.
    """
    n = values.size
    out = np.full(n, np.nan)
    last_non_finite = -window
    have_state = False
    origin = 0.0
    mean = 0.0  # from origin
    squares = 0.0
    peak = 0.0
    for end in range(n):
        if not np.isfinite(values[end]):
            last_non_finite = end
        if end < window - 1:
            continue
        if end - last_non_finite < window:
            have_state = False
            continue
        updated = False
        if have_state and end % window != 0:
            entering = values[end] - origin
            leaving = values[end - window] - origin
            step = entering - leaving
            new_mean = mean + step / window
            squares += step * ((entering - new_mean) + (leaving - mean))
            mean = new_mean
            peak = max(peak, squares)
            updated = squares >= 1e-3 * peak
        if not updated:
            origin = values[end]
            mean, squares = _exact_mean_and_squares(values, end - window + 1, end, origin)
            peak = squares
            have_state = True
        out[end] = 0.0 if squares < 0.0 else np.sqrt(squares / (window - ddof))  # < 0: rounding, flat window
    return out


@njit(cache=True)
def _cci(typical_price, window):
    """TA-Lib's CCI over each window: exact mean and mean absolute deviation, 0 on a flat window."""
    n = typical_price.size
    out = np.full(n, np.nan)
    for end in range(window - 1, n):
        start = end - window + 1
        total = 0.0
        for i in range(start, end + 1):
            total += typical_price[i]
        mean = total / window
        absolute_deviations = 0.0
        for i in range(start, end + 1):
            absolute_deviations += abs(typical_price[i] - mean)
        mean_deviation = absolute_deviations / window
        distance = typical_price[end] - mean
        flat = _FLAT_TOLERANCE * abs(mean)
        if abs(distance) <= flat or mean_deviation <= flat:
            out[end] = 0.0
        else:
            out[end] = distance / (_CCI_CONSTANT * mean_deviation)
    return out


# --------------------------------------------------------------------------------------------------------
# Input handling shared by every indicator.
# --------------------------------------------------------------------------------------------------------

_DATA_INPUTS = frozenset({"values", "close", "high", "low", "volume"})


def _as_float_array(values, name: str) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _inputs(**named_values) -> tuple[list[np.ndarray], int, int]:
    """The inputs as float arrays, their common length, and the first row where none of them is NaN."""
    arrays = [_as_float_array(values, name) for name, values in named_values.items()]
    lengths = {name: array.size for name, array in zip(named_values, arrays, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    length = arrays[0].size
    complete = np.ones(length, dtype=bool)
    for array in arrays:
        complete &= ~np.isnan(array)
    first_complete = int(np.argmax(complete)) if complete.any() else length
    return [array[first_complete:] for array in arrays], length, first_complete


def _place(length: int, start: int, tail: np.ndarray) -> np.ndarray:
    """``tail``, computed from row ``start`` on, in a full-length array led by NaN."""
    if start == 0:
        return tail
    out = np.full(length, np.nan)
    out[start:] = tail
    return out


def _after(rows: int, values: np.ndarray) -> np.ndarray:
    """``values`` (which start at row ``rows``) led by ``rows`` NaN."""
    out = np.full(rows + values.size, np.nan)
    out[rows:] = values
    return out


def _check_window(name: str, value, minimum: int = 1) -> int:
    try:
        window = operator.index(value)
    except TypeError:
        window = None
    if window is None or isinstance(value, bool) or window < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return window


def _check_macd(fast, slow, signal) -> tuple[int, int, int]:
    fast = _check_window("fast", fast)
    slow = _check_window("slow", slow, minimum=2)
    signal = _check_window("signal", signal)
    if fast >= slow:
        raise ValueError(f"fast ({fast}) must be shorter than slow ({slow})")
    return fast, slow, signal


def _ema_alpha(window: int) -> float:
    return 2.0 / (window + 1)


# --------------------------------------------------------------------------------------------------------
# Indicators.
# --------------------------------------------------------------------------------------------------------


def sma(values, window: int) -> np.ndarray:
    """Simple moving average (TA-Lib SMA); defined from row ``window - 1``."""
    window = _check_window("window", window)
    (x,), length, start = _inputs(values=values)
    return _place(length, start, _rolling_sum(x, window) / window)


def ema(values, window: int) -> np.ndarray:
    """Exponential moving average (TA-Lib EMA): seeded at row ``window - 1`` with the SMA of the first
    ``window`` values, then ``alpha = 2 / (window + 1)``."""
    window = _check_window("window", window)
    (x,), length, start = _inputs(values=values)
    return _place(length, start, _ema_from(x, window, _ema_alpha(window), window - 1))


def rsi(close, window: int = 14) -> np.ndarray:
    """Wilder's RSI (TA-Lib RSI): Wilder-smoothed gains over gains plus losses, from row ``window``.

    0 where the smoothed gains and losses are both exactly 0 (no price change at all), as TA-Lib 0.8 does.
    """
    window = _check_window("window", window)
    (x,), length, start = _inputs(close=close)
    return _place(length, start, _rsi(x, window))


def macd(close, fast: int = 12, slow: int = 26, signal: int = 9) -> MACD:
    """MACD (TA-Lib MACD): fast EMA minus slow EMA, its EMA as signal line, and their difference.

    The MACD line is defined from row ``slow - 1`` (TA-Lib hides it until the signal line starts; the values
    are the same), the signal line and histogram from row ``slow + signal - 2`` (:func:`lookback`). As in
    TA-Lib, the fast EMA starts on the slow EMA's first row, seeded with the mean of the ``fast`` prices
    ending there. ``fast < slow`` is required (TA-Lib would silently swap them).
    """
    fast, slow, signal = _check_macd(fast, slow, signal)
    (x,), length, start = _inputs(close=close)
    first = slow - 1
    macd_line = _ema_from(x, fast, _ema_alpha(fast), first) - _ema_from(x, slow, _ema_alpha(slow), first)
    signal_line = _ema_from(macd_line, signal, _ema_alpha(signal), first + signal - 1)
    lines = (macd_line, signal_line, macd_line - signal_line)
    return MACD(*(_place(length, start, line) for line in lines))


def bollinger(close, window: int = 20, n_std: float = 2.0) -> Bollinger:
    """Bollinger Bands (TA-Lib BBANDS, SMA middle): middle +- ``n_std`` population standard deviations.

    ``middle`` equals :func:`sma`. The deviation is good to ~1e-14 of itself; TA-Lib's running
    E[x^2] - mean^2 is off by up to ~1e-10 of it (~1e-12 of the price level), which bounds the agreement.
    """
    window = _check_window("window", window)
    (x,), length, start = _inputs(close=close)
    middle = _rolling_sum(x, window) / window
    width = n_std * _rolling_std(x, window, 0)
    bands = (middle, middle + width, middle - width)
    return Bollinger(*(_place(length, start, band) for band in bands))


def cci(high, low, close, window: int = 20) -> np.ndarray:
    """Commodity Channel Index (TA-Lib CCI): (typical price - its SMA) / (0.015 * mean absolute deviation).

    0 where the window is flat to 1e-14 of its price level (TA-Lib's test; avoids dividing rounding noise).
    """
    window = _check_window("window", window, minimum=2)
    (high, low, close), length, start = _inputs(high=high, low=low, close=close)
    return _place(length, start, _cci((high + low + close) / 3, window))


def atr(high, low, close, window: int = 14) -> np.ndarray:
    """Average True Range (TA-Lib ATR): Wilder-smoothed true range, from row ``window``.

    The true range (from row 1) is the largest of high - low, |previous close - high|, |previous close - low|.
    """
    window = _check_window("window", window)
    (high, low, close), length, start = _inputs(high=high, low=low, close=close)
    return _place(length, start, _atr(high, low, close, window))


def rate_of_change(close, window: int = 10) -> np.ndarray:
    """Rate of change in percent (TA-Lib ROC): ``(close / close[t - window] - 1) * 100``.

    0 where the earlier price is exactly 0, as TA-Lib does.
    """
    window = _check_window("window", window)
    (x,), length, start = _inputs(close=close)
    earlier, now = x[: max(x.size - window, 0)], x[window:]
    with np.errstate(invalid="ignore", divide="ignore"):
        change = np.where(earlier != 0.0, (now / earlier - 1.0) * 100.0, 0.0)
    return _place(length, start, _after(min(window, x.size), change))


def ease_of_movement(high, low, volume, window: int = 14) -> np.ndarray:
    """Ease of Movement, smoothed (``ta``'s ``EaseOfMovementIndicator(...).sma_ease_of_movement()``).

    ``EMV = (diff(high) + diff(low)) * (high - low) / (2 * volume) * 1e8`` (defined from row 1), averaged
    over ``window`` rows: defined from row ``window``, which is where ``ta`` (``fillna=False``) starts too.
    A zero volume gives inf, or NaN on a flat bar (0/0), in every window that holds it (``ta``: NaN).
    """
    window = _check_window("window", window)
    (high, low, volume), length, start = _inputs(high=high, low=low, volume=volume)
    smoothed = _rolling_sum(_movement(high, low, volume), window) / window
    return _place(length, start, _after(min(1, high.size), smoothed))


def _movement(high: np.ndarray, low: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """One-bar Ease of Movement of rows 1.. (``ta``'s scale), before the smoothing."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.diff(high) + np.diff(low)) * (high[1:] - low[1:]) / (2 * volume[1:]) * _EMV_SCALE


def force_index(close, volume, window: int = 13) -> np.ndarray:
    """Force Index (``ta``'s ``ForceIndexIndicator(...).force_index()``): EMA of price change * volume.

    ``ta`` uses pandas' ``ewm(span=window, adjust=False, min_periods=window)``: the EMA is seeded with the
    first change * volume (row 1) and reported from row ``window``, once it has seen ``window`` values.
    """
    window = _check_window("window", window)
    (close, volume), length, start = _inputs(close=close, volume=volume)
    smoothed = _ema_from(_force(close, volume), 1, _ema_alpha(window), 0)
    smoothed[: window - 1] = np.nan  # pandas' min_periods: not reported before `window` values were seen
    return _place(length, start, _after(min(1, close.size), smoothed))


def _force(close: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Price change times volume of rows 1.., before the smoothing."""
    return np.diff(close) * volume[1:]


def log_return(close, window: int = 1) -> np.ndarray:
    """``log(close[t] / close[t - window])``; the first ``window`` rows are NaN.

    The log of the ratio (accurate for small returns); pandas' ``log(close).diff(window)`` agrees to ~1e-15.
    A non-positive price gives NaN or +-inf.
    """
    window = _check_window("window", window)
    (x,), length, start = _inputs(close=close)
    with np.errstate(invalid="ignore", divide="ignore"):
        returns = np.log(x[window:] / x[: max(x.size - window, 0)])
    return _place(length, start, _after(min(window, x.size), returns))


def rolling_volatility(close, window: int = 24) -> np.ndarray:
    """Sample standard deviation (ddof=1) of the last ``window`` one-bar log returns; the first ``window``
    rows are NaN. Per bar, not annualised (multiply by ``sqrt(Timeframe.bars_per_year)`` for that)."""
    window = _check_window("window", window, minimum=2)
    (x,), length, start = _inputs(close=close)
    with np.errstate(invalid="ignore", divide="ignore"):
        returns = np.log(x[1:] / x[:-1])
    return _place(length, start, _after(min(1, x.size), _rolling_std(returns, window, 1)))


# --------------------------------------------------------------------------------------------------------
# Resumable forms: the values of the rows from ``begin`` on of a series extended by new rows, from the state
# the indicator had at ``begin - 1``, so a caller that appends bars (pricelevel.features.incremental) pays
# for the new rows only. Each runs the indicator's own compiled loop from that state, so the values equal to
# the bit those of the indicator on the whole series (tests/test_incremental.py). They take the whole series
# (views, not copies) and read only its last rows; inputs are finite and ``begin`` is past the lookback (no
# leading-NaN handling, no warm-up). A ``*_state`` function gives the state after a series' last row where
# it is not simply the indicator's last value (EMA, ATR and force index carry just that).
# --------------------------------------------------------------------------------------------------------


def sma_state(values, window: int) -> tuple:
    """The rolling sum's state after the last of ``values`` (for :func:`sma_resume`)."""
    return _rolling_sum_run(_as_float_array(values, "values"), window, 0, (0.0, 0.0, 0, 0, 0))[1]


def sma_resume(values, window: int, begin: int, state: tuple) -> tuple[np.ndarray, tuple]:
    """:func:`sma` of rows ``begin..`` and the state after the last (``begin >= window``)."""
    x = _as_float_array(values, "values")[begin - window :]
    sums, state = _rolling_sum_run(x, window, window, state)
    return sums / window, state


def ema_resume(values, window: int, begin: int, last: float) -> np.ndarray:
    """:func:`ema` of rows ``begin..``, from ``last``, its value at row ``begin - 1``."""
    return _ema_run(_as_float_array(values, "values"), _ema_alpha(window), begin, last)


def rsi_state(close, window: int = 14) -> tuple[float, float]:
    """The average gain and loss after the last close (for :func:`rsi_resume`)."""
    _, gain, loss = _rsi_run(_as_float_array(close, "close"), window, 1, 0.0, 0.0)
    return gain, loss


def rsi_resume(close, window: int, begin: int, state: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
    """:func:`rsi` of rows ``begin..`` and the averages after the last (``begin > window``)."""
    out, gain, loss = _rsi_run(_as_float_array(close, "close"), window, begin, *state)
    return out, (gain, loss)


def atr_resume(high, low, close, window: int, begin: int, last: float) -> np.ndarray:
    """:func:`atr` of rows ``begin..``, from ``last``, its value at row ``begin - 1`` (``begin > window``)."""
    arrays = (_as_float_array(a, name) for a, name in ((high, "high"), (low, "low"), (close, "close")))
    return _atr_run(*arrays, window, begin, last)[0]


def macd_state(close, fast: int = 12, slow: int = 26, signal: int = 9) -> tuple[float, float, float]:
    """The fast EMA, slow EMA and signal line at the last close (for :func:`macd_resume`)."""
    fast, slow, signal = _check_macd(fast, slow, signal)
    x = _as_float_array(close, "close")
    fast_ema = _ema_from(x, fast, _ema_alpha(fast), slow - 1)
    slow_ema = _ema_from(x, slow, _ema_alpha(slow), slow - 1)
    signal_line = _ema_from(fast_ema - slow_ema, signal, _ema_alpha(signal), slow + signal - 2)
    return fast_ema[-1], slow_ema[-1], signal_line[-1]


def macd_resume(
    close, fast: int, slow: int, signal: int, begin: int, state: tuple[float, float, float]
) -> tuple[MACD, tuple[float, float, float]]:
    """:func:`macd` of rows ``begin..`` and the state after the last (``begin > slow + signal - 2``)."""
    x = _as_float_array(close, "close")
    fast_ema = _ema_run(x, _ema_alpha(fast), begin, state[0])
    slow_ema = _ema_run(x, _ema_alpha(slow), begin, state[1])
    macd_line = fast_ema - slow_ema
    signal_line = _ema_run(macd_line, _ema_alpha(signal), 0, state[2])
    lines = MACD(macd_line, signal_line, macd_line - signal_line)
    return lines, (fast_ema[-1], slow_ema[-1], signal_line[-1]) if macd_line.size else state


def bollinger_resume(close, window: int, n_std: float, begin: int, state: tuple) -> tuple[Bollinger, tuple]:
    """:func:`bollinger` of rows ``begin..`` and the middle band's state after the last (``begin >= window``).

    The deviation restarts from an exact two-pass sum every ``window`` rows (:func:`_rolling_std`), so it is
    recomputed from the restart before ``begin``: a run from a multiple of ``window`` that ends ``window`` rows
    before ``begin`` or earlier has restarted in step with the whole series by then.
    """
    middle, state = sma_resume(close, window, begin, state)
    origin = _aligned_start(begin, window)
    deviation = _rolling_std(_as_float_array(close, "close")[origin:], window, 0)[begin - origin :]
    width = n_std * deviation
    return Bollinger(middle, middle + width, middle - width), state


def rolling_volatility_resume(close, window: int, begin: int) -> np.ndarray:
    """:func:`rolling_volatility` of rows ``begin..`` (its deviation restarts as in :func:`bollinger_resume`;
    return ``r`` is row ``r + 1``)."""
    origin = _aligned_start(begin - 1, window)
    return rolling_volatility(_as_float_array(close, "close")[origin:], window)[begin - origin :]


def _aligned_start(begin: int, window: int) -> int:
    """The latest multiple of ``window`` at least ``window`` rows before ``begin`` (0 if none)."""
    return max(0, (begin - window) // window * window)


def ease_of_movement_state(high, low, volume, window: int = 14) -> tuple:
    """The smoothing's state after the last row (for :func:`ease_of_movement_resume`)."""
    arrays = [_as_float_array(a, name) for a, name in ((high, "high"), (low, "low"), (volume, "volume"))]
    return _rolling_sum_run(_movement(*arrays), window, 0, (0.0, 0.0, 0, 0, 0))[1]


def ease_of_movement_resume(high, low, volume, window: int, begin: int, state: tuple) -> tuple[np.ndarray, tuple]:
    """:func:`ease_of_movement` of rows ``begin..`` and the smoothing's state after the last (``begin > window``)."""
    first = begin - window - 1  # the movement of row r reads row r - 1; the window reaches back `window` rows
    arrays = [_as_float_array(a, name)[first:] for a, name in ((high, "high"), (low, "low"), (volume, "volume"))]
    sums, state = _rolling_sum_run(_movement(*arrays), window, window, state)
    return sums / window, state


def force_index_resume(close, volume, window: int, begin: int, last: float) -> np.ndarray:
    """:func:`force_index` of rows ``begin..``, from ``last``, its value at row ``begin - 1`` (``begin > window``)."""
    change = _force(_as_float_array(close, "close")[begin - 1 :], _as_float_array(volume, "volume")[begin - 1 :])
    return _ema_run(change, _ema_alpha(window), 0, last)


# --------------------------------------------------------------------------------------------------------
# Warm-up lengths.
# --------------------------------------------------------------------------------------------------------


def _macd_lookback(fast, slow, signal) -> int:
    fast, slow, signal = _check_macd(fast, slow, signal)
    return (slow - 1) + (signal - 1)


# name: (indicator, its leading NaN rows as a function of its parameters)
_WARMUPS: MappingProxyType[str, tuple[Callable, Callable[..., int]]] = MappingProxyType(
    {
        "sma": (sma, lambda window: _check_window("window", window) - 1),
        "ema": (ema, lambda window: _check_window("window", window) - 1),
        "rsi": (rsi, lambda window: _check_window("window", window)),
        "macd": (macd, _macd_lookback),
        "bollinger": (bollinger, lambda window, n_std: _check_window("window", window) - 1),
        "cci": (cci, lambda window: _check_window("window", window, minimum=2) - 1),
        "atr": (atr, lambda window: _check_window("window", window)),
        "rate_of_change": (rate_of_change, lambda window: _check_window("window", window)),
        "ease_of_movement": (ease_of_movement, lambda window: _check_window("window", window)),
        "force_index": (force_index, lambda window: _check_window("window", window)),
        "log_return": (log_return, lambda window: _check_window("window", window)),
        "rolling_volatility": (rolling_volatility, lambda window: _check_window("window", window, minimum=2)),
    }
)


def lookback(name: str, **params) -> int:
    """Leading NaN rows of indicator ``name`` (a function of this module) called with ``params`` (its own
    defaults for the others), for finite inputs. Equals TA-Lib's lookback for the TA-Lib indicators; for
    :func:`macd` and :func:`bollinger` it is that of the signal line / bands. Bad parameters raise as the
    indicator would."""
    try:
        indicator, warmup = _WARMUPS[name]
    except KeyError:
        raise ValueError(f"unknown indicator {name!r}; known: {', '.join(_WARMUPS)}") from None
    settings = {
        parameter.name: parameter.default
        for parameter in inspect.signature(indicator).parameters.values()
        if parameter.name not in _DATA_INPUTS
    }
    unknown = set(params) - set(settings)
    if unknown:
        raise TypeError(f"{name}() has no parameter {', '.join(sorted(unknown))}")
    settings.update(params)
    missing = [key for key, value in settings.items() if value is inspect.Parameter.empty]
    if missing:
        raise TypeError(f"lookback({name!r}) needs {', '.join(missing)} (no default)")
    return warmup(**settings)
