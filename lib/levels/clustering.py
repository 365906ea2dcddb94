"""Exact one-dimensional DBSCAN: scikit-learn's labels from a sort and a few linear passes.

scikit-learn's ``DBSCAN(eps, min_samples).fit(x[:, None]).labels_`` is defined by these rules, which the
functions below follow exactly:

- The neighbours of a point are the points at distance ``<= eps``, itself included; a point is a *core*
  point when it has at least ``min_samples`` neighbours.
- A cluster is a connected group of cores (two cores within ``eps`` are connected) plus the non-core points
  within ``eps`` of one of its cores (*border* points). Every other point is noise, ``-1``.
- Numbering: ``dbscan_inner`` walks the points in input order and expands the whole cluster of each core not
  yet labelled, so cluster ``k`` is the one whose earliest core (in input order) comes ``k``-th; a border point
  within ``eps`` of cores of several clusters is taken by the first expanded, the smallest number.

On a sorted line every rule is local. The neighbours of a point are a contiguous run, so whether it holds
``min_samples`` points is a test of the points ``min_samples - 1`` places away (a short binary search where
points are sparse); the cores of a cluster are a maximal run of consecutive cores less than ``eps`` apart; and
the cores within ``eps`` on one side of a point are within ``eps`` of each other, so one cluster: a border point
only has to look at the nearest core on its left and on its right.

Distances: scikit-learn searches 12 points or more with a k-d tree, ``|a - b| <= eps`` as here, except that
its leaves compare squared distances, so a distance one unit in the last place above ``eps`` may count there
depending on the tree's shape (not reproduced; it needs a distance within rounding of ``eps``). Up to 11 points
it uses brute force, ``max(0, (a*a + -2*a*b) + b*b) <= eps*eps``, whose rounding decides distances near ``eps``
(a pair exactly ``eps`` apart often falls out): that arithmetic and its cluster expansion are replayed as is.

The kernels are compiled by numba (cached on disk next to this file).
"""

from __future__ import annotations

import numpy as np
from numba import njit


def dbscan_1d(values: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Labels of ``sklearn.cluster.DBSCAN(eps, min_samples)`` on the points ``values`` (``-1`` = noise)."""
    points = np.ascontiguousarray(values, dtype=np.float64).ravel()
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    if not np.isfinite(points).all():
        raise ValueError("DBSCAN points must be finite")
    order = np.argsort(points, kind="stable").astype(np.int64)
    count = points.size
    labels = np.empty(count, dtype=np.int64)
    scratch = [np.empty(count, dtype=np.int64) for _ in range(5)]
    label_sorted(points[order], order, count, 0, float(eps), int(min_samples), labels, *scratch)
    return labels.astype(np.intp, copy=False)


@njit(cache=True)
def label_sorted(values, keys, count, key_base, eps, min_samples, labels, scratch, cluster_key, sizes, firsts,
                 lasts):
    """DBSCAN of ``values[:count]`` (sorted ascending); ``labels[keys[i] - key_base]`` gets point i's label.

    ``keys`` are the points' input positions (unique): they decide the numbering. Returns the cluster count
    and fills, per cluster label, ``sizes`` and the smallest and largest member key (``firsts``, ``lasts``).
    ``scratch`` and ``cluster_key`` are work space; every array holds at least ``count`` items.
    """
    if count <= _BRUTE_FORCE_POINTS:
        return _label_like_brute_force(values, keys, count, key_base, eps, min_samples, labels, sizes, firsts,
                                       lasts)
    # Left to right. The neighbours of values[i] are a run values[left..right]; i is core when the run holds
    # min_samples = span + 1 points, i.e. values[left + span] is within eps. Where points are dense the
    # span points just before or just after i are within eps (core, no search); otherwise left is in
    # (i - span, i] and found by binary search. Cores less than eps apart form a cluster (temporary number in
    # sorted order, remembering its earliest key); a non-core point notes the cluster of the nearest core on
    # its left when it is within eps.
    # scratch[i] = temporary cluster number for a core, -2 - that number for a border noted, -1 otherwise.
    span = min_samples - 1
    n_clusters = 0
    last_core = -1
    for i in range(count):
        x = values[i]
        core = (i >= span and x - values[i - span] <= eps) or (i + span < count and values[i + span] - x <= eps)
        if not core:
            left = max(0, i - span + 1)
            high = i
            while left < high:
                middle = (left + high) // 2
                if x - values[middle] <= eps:
                    high = middle
                else:
                    left = middle + 1
            core = left + span < count and values[left + span] - x <= eps
        if core:
            if last_core < 0 or x - values[last_core] > eps:
                cluster_key[n_clusters] = keys[i]
                n_clusters += 1
            elif keys[i] < cluster_key[n_clusters - 1]:
                cluster_key[n_clusters - 1] = keys[i]
            scratch[i] = n_clusters - 1
            last_core = i
        elif last_core >= 0 and x - values[last_core] <= eps:
            scratch[i] = -2 - (n_clusters - 1)
        else:
            scratch[i] = -1
    if n_clusters == 0:
        for i in range(count):
            labels[keys[i] - key_base] = -1
        return 0
    # scikit-learn's numbers: clusters ranked by their earliest core (cluster_key turns into the rank).
    _rank_in_place(cluster_key, n_clusters)
    # Right to left: cores take their number; a border point the smaller of its left and right cluster.
    # Members come in long runs of one label, counted in registers and written when the label changes.
    for c in range(n_clusters):
        sizes[c] = 0
    run_label = -1
    run_size = 0
    run_first = 0
    run_last = 0
    next_core = -1
    for i in range(count - 1, -1, -1):
        mark = scratch[i]
        if mark >= 0:
            label = cluster_key[mark]
            next_core = i
        else:
            label = cluster_key[-2 - mark] if mark <= -2 else -1
            if next_core >= 0 and values[next_core] - values[i] <= eps:
                right_label = cluster_key[scratch[next_core]]
                if label < 0 or right_label < label:
                    label = right_label
        key = keys[i]
        labels[key - key_base] = label
        if label != run_label:
            _add_run(run_label, run_size, run_first, run_last, sizes, firsts, lasts)
            run_label = label
            run_size = 0
            run_first = key
            run_last = key
        run_size += 1
        run_first = min(run_first, key)
        run_last = max(run_last, key)
    _add_run(run_label, run_size, run_first, run_last, sizes, firsts, lasts)
    return n_clusters


#: scikit-learn's DBSCAN searches neighbours by brute force up to this many points (``NearestNeighbors`` with
#: its default ``n_neighbors=5`` picks brute force when ``5 >= n // 2``).
_BRUTE_FORCE_POINTS = 11


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _label_like_brute_force(values, keys, count, key_base, eps, min_samples, labels, sizes, firsts, lasts):
    """:func:`label_sorted` for a few points, as scikit-learn computes it then: squared distances by its GEMM
    formula (query row first), then ``dbscan_inner``'s expansion in input order."""
    by_key = np.empty(count, dtype=np.int64)  # sorted positions in input order
    for i in range(count):
        j = i
        while j > 0 and keys[by_key[j - 1]] > keys[i]:
            by_key[j] = by_key[j - 1]
            j -= 1
        by_key[j] = i
    points = np.empty(count, dtype=np.float64)
    for i in range(count):
        points[i] = values[by_key[i]]
    reach = eps * eps
    neighbour = np.zeros((count, count), dtype=np.bool_)
    is_core = np.zeros(count, dtype=np.bool_)
    for i in range(count):
        found = 0
        for j in range(count):
            squared = (points[i] * points[i] + -2.0 * (points[i] * points[j])) + points[j] * points[j]
            neighbour[i, j] = max(0.0, squared) <= reach
            found += neighbour[i, j]
        is_core[i] = found >= min_samples
    label_of = np.full(count, -1, dtype=np.int64)
    stack = np.empty(count * count + 1, dtype=np.int64)
    n_clusters = 0
    for seed in range(count):
        if label_of[seed] != -1 or not is_core[seed]:
            continue
        depth = 0
        stack[depth] = seed
        depth += 1
        while depth > 0:
            depth -= 1
            i = stack[depth]
            if label_of[i] != -1:
                continue
            label_of[i] = n_clusters
            if is_core[i]:
                for j in range(count):
                    if neighbour[i, j] and label_of[j] == -1:
                        stack[depth] = j
                        depth += 1
        n_clusters += 1
    for c in range(n_clusters):
        sizes[c] = 0
    for i in range(count):
        key = keys[by_key[i]]
        label = label_of[i]
        labels[key - key_base] = label
        if label >= 0:
            _add_run(label, 1, key, key, sizes, firsts, lasts)
    return n_clusters


@njit(cache=True, inline="always", no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _add_run(label, size, first, last, sizes, firsts, lasts):
    if label < 0:
        return
    if sizes[label] == 0:
        firsts[label] = first
        lasts[label] = last
    else:
        firsts[label] = min(firsts[label], first)
        lasts[label] = max(lasts[label], last)
    sizes[label] += size


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _rank_in_place(items, count):
    """Replace ``items[:count]`` (distinct) by their ranks."""
    if count <= _SHORT:
        ranks = np.empty(count, dtype=np.int64)
        for i in range(count):
            below = 0
            for j in range(count):
                if items[j] < items[i]:
                    below += 1
            ranks[i] = below
        for i in range(count):
            items[i] = ranks[i]
        return
    order = np.empty(count, dtype=np.int64)
    for i in range(count):
        order[i] = i
    _argsort_by(items, order, count)
    for r in range(count):
        items[order[r]] = r


def cluster_windows(
    values: np.ndarray, lo: np.ndarray, hi: np.ndarray, eps_frac: float, min_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, float]:
    """DBSCAN of each window ``values[lo[w]:hi[w]]`` with ``eps = eps_frac x median``; windows move forward.

    ``lo`` and ``hi`` never decrease, so the window's points are kept sorted (by value, then index) and updated
    as it moves (points that left dropped, new ones inserted) instead of sorted again. Input order inside a
    window is index order. Returns ``(window, mean, size, first, last, bad_window, bad_eps)``: one row per
    cluster, windows in order and clusters by mean (ties by cluster number); ``mean`` adds the members in index
    order (as ``np.bincount``); ``first``/``last`` are the first and last member's index into ``values``.
    ``bad_window >= 0`` is the first window whose eps is not a positive number (``bad_eps``); rows stop there.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    lo = np.ascontiguousarray(lo, dtype=np.int64)
    hi = np.ascontiguousarray(hi, dtype=np.int64)
    if lo.shape != hi.shape or (lo.size > 1 and (np.any(np.diff(lo) < 0) or np.any(np.diff(hi) < 0))):
        raise ValueError("window bounds must have one lo and one hi per window, neither decreasing")
    if lo.size and (lo.min() < 0 or hi.max() > values.size):
        raise ValueError("window bounds must lie within values")
    # Sorting by (value, index) is sorting by this rank: the kernel compares integers, and never sorts values.
    rank = np.empty(values.size, dtype=np.int64)
    rank[np.argsort(values, kind="stable")] = np.arange(values.size)
    window, mean, size, first, last, bad_window, bad_eps = _cluster_windows(
        values, rank, lo, hi, float(eps_frac), int(min_samples)
    )
    return window, mean, size, first, last, int(bad_window), float(bad_eps)


@njit(cache=True)
def _cluster_windows(values, rank, lo, hi, eps_frac, min_samples):
    """:func:`cluster_windows`, compiled; ``rank`` orders ``values`` by (value, index)."""
    n_windows = lo.shape[0]
    capacity = 1
    for w in range(n_windows):
        capacity = max(capacity, hi[w] - lo[w])
    sorted_values = np.empty(capacity, dtype=np.float64)
    sorted_keys = np.empty(capacity, dtype=np.int64)
    spare_values = np.empty(capacity, dtype=np.float64)
    spare_keys = np.empty(capacity, dtype=np.int64)
    scratch = np.empty(capacity, dtype=np.int64)
    cluster_key = np.empty(capacity, dtype=np.int64)
    index_label = np.empty(capacity, dtype=np.int64)
    sums = np.empty(capacity, dtype=np.float64)
    sizes = np.empty(capacity, dtype=np.int64)
    firsts = np.empty(capacity, dtype=np.int64)
    lasts = np.empty(capacity, dtype=np.int64)
    means = np.empty(capacity, dtype=np.float64)
    order = np.empty(capacity, dtype=np.int64)
    events = np.empty(3 * _FEW_CHANGES, dtype=np.int64)

    row_capacity = max(16, 8 * n_windows)
    out_window = np.empty(row_capacity, dtype=np.int64)
    out_mean = np.empty(row_capacity, dtype=np.float64)
    out_size = np.empty(row_capacity, dtype=np.int64)
    out_first = np.empty(row_capacity, dtype=np.int64)
    out_last = np.empty(row_capacity, dtype=np.int64)
    n_rows = 0

    size = 0
    held_lo = 0  # the points held are values[held_lo:held_hi]
    held_hi = 0
    for w in range(n_windows):
        start, stop = lo[w], hi[w]
        if stop <= start:
            size = 0
            held_lo = held_hi = start
            continue
        first_new = max(held_hi, start)
        n_gone = min(start, held_hi) - held_lo if size > 0 else 0
        if n_gone <= _FEW_CHANGES and stop - first_new <= _FEW_CHANGES:
            size = _splice(values, rank, sorted_values, sorted_keys, size, held_lo, n_gone, first_new, stop,
                           spare_values, spare_keys, events)
        else:
            size = _merge(values, rank, sorted_values, sorted_keys, size, start, first_new, stop, spare_values,
                          spare_keys, order)
        sorted_values, spare_values = spare_values, sorted_values
        sorted_keys, spare_keys = spare_keys, sorted_keys
        held_lo, held_hi = start, stop

        half = size // 2
        if size % 2 == 1:
            median = sorted_values[half]
        else:
            median = (sorted_values[half - 1] + sorted_values[half]) / 2.0  # as np.median
        eps = eps_frac * median
        if not (np.isfinite(eps) and eps > 0):
            return (out_window[:n_rows], out_mean[:n_rows], out_size[:n_rows], out_first[:n_rows],
                    out_last[:n_rows], w, eps)
        n_clusters = label_sorted(sorted_values, sorted_keys, size, start, eps, min_samples, index_label, scratch,
                                  cluster_key, sizes, firsts, lasts)
        if n_clusters == 0:
            continue
        _sum_by_label(values[start:stop], index_label, n_clusters, sums)
        for c in range(n_clusters):
            means[c] = sums[c] / sizes[c]
        _order_by_value(means, n_clusters, order)

        if n_rows + n_clusters > row_capacity:
            row_capacity = max(2 * row_capacity, n_rows + n_clusters)
            out_window = _grown(out_window, row_capacity)
            out_mean = _grown(out_mean, row_capacity)
            out_size = _grown(out_size, row_capacity)
            out_first = _grown(out_first, row_capacity)
            out_last = _grown(out_last, row_capacity)
        for r in range(n_clusters):
            c = order[r]
            out_window[n_rows] = w
            out_mean[n_rows] = means[c]
            out_size[n_rows] = sizes[c]
            out_first[n_rows] = firsts[c]
            out_last[n_rows] = lasts[c]
            n_rows += 1
    return out_window[:n_rows], out_mean[:n_rows], out_size[:n_rows], out_first[:n_rows], out_last[:n_rows], -1, 0.0


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _sum_by_label(values, labels, n_labels, sums):
    """``sums[c]``: the values labelled ``c`` added in order from 0.0, as ``np.bincount(labels, weights)``.

    The order is fixed, so each sum is one chain of additions; with few labels the chains run side by side in
    registers (adding 0.0 for another label's value changes nothing), otherwise through memory.
    """
    if n_labels > 4:
        for c in range(n_labels):
            sums[c] = 0.0
        for k in range(values.shape[0]):
            c = labels[k]
            if c >= 0:
                sums[c] += values[k]
        return
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for k in range(values.shape[0]):
        c = labels[k]
        x = values[k]
        s0 += x if c == 0 else 0.0
        s1 += x if c == 1 else 0.0
        s2 += x if c == 2 else 0.0
        s3 += x if c == 3 else 0.0
    sums[0] = s0
    sums[1] = s1
    sums[2] = s2
    sums[3] = s3


#: Window updates with at most this many points out and in are spliced; more, merged.
_FEW_CHANGES = 16
#: Lists up to this long are sorted by insertion (or counting); longer ones by heapsort.
_SHORT = 32


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _splice(values, rank, sorted_values, sorted_keys, size, gone_lo, n_gone, first_new, stop, out_values, out_keys,
            events):
    """Copy the held points to ``out_*`` without keys ``gone_lo..gone_lo+n_gone-1``, with ``first_new..stop-1``.

    Few points change, so the copy is runs of untouched points between the removal and insertion positions
    (found by binary search). Returns the new size. ``events``: scratch for ``3 x _FEW_CHANGES`` items.
    """
    n_new = stop - first_new
    gone_at = events[:n_gone]
    for k in range(n_gone):
        gone_at[k] = _position(rank, sorted_keys, size, rank[gone_lo + k])
    _insertion_sort(gone_at, n_gone)
    # New points in rank order, each with the held position it goes before.
    new_keys = events[_FEW_CHANGES : _FEW_CHANGES + n_new]
    new_at = events[2 * _FEW_CHANGES : 2 * _FEW_CHANGES + n_new]
    for k in range(n_new):
        key = first_new + k
        j = k
        while j > 0 and rank[new_keys[j - 1]] > rank[key]:
            new_keys[j] = new_keys[j - 1]
            j -= 1
        new_keys[j] = key
    for k in range(n_new):
        new_at[k] = _position(rank, sorted_keys, size, rank[new_keys[k]])
    held = 0
    out = 0
    a = 0
    b = 0
    while a < n_new or b < n_gone:
        inserting = a < n_new and (b >= n_gone or new_at[a] <= gone_at[b])
        at = new_at[a] if inserting else gone_at[b]
        _copy_run(sorted_values, sorted_keys, held, at, out_values, out_keys, out)
        out += at - held
        if inserting:
            out_keys[out] = new_keys[a]
            out_values[out] = values[new_keys[a]]
            out += 1
            held = at
            a += 1
        else:
            held = at + 1
            b += 1
    _copy_run(sorted_values, sorted_keys, held, size, out_values, out_keys, out)
    return out + size - held


@njit(cache=True, inline="always", no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _copy_run(values, keys, start, stop, out_values, out_keys, out):
    for k in range(stop - start):
        out_values[out + k] = values[start + k]
        out_keys[out + k] = keys[start + k]


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _merge(values, rank, sorted_values, sorted_keys, size, start, first_new, stop, out_values, out_keys, new_keys):
    """Drop held points with key < ``start``, merge in ``values[first_new:stop]``; returns the new size."""
    n_new = stop - first_new
    for k in range(n_new):
        new_keys[k] = first_new + k
    _argsort_by(rank, new_keys, n_new)
    i = 0
    j = 0
    merged = 0
    while i < size or j < n_new:
        if i < size and sorted_keys[i] < start:
            i += 1
            continue
        if j >= n_new or (i < size and rank[sorted_keys[i]] < rank[new_keys[j]]):
            out_values[merged] = sorted_values[i]
            out_keys[merged] = sorted_keys[i]
            i += 1
        else:
            out_keys[merged] = new_keys[j]
            out_values[merged] = values[new_keys[j]]
            j += 1
        merged += 1
    return merged


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _position(rank, sorted_keys, size, key_rank):
    """Where a point of rank ``key_rank`` is or goes among the held points: the first one not below it."""
    low = 0
    high = size
    while low < high:
        middle = (low + high) // 2
        if rank[sorted_keys[middle]] < key_rank:
            low = middle + 1
        else:
            high = middle
    return low


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _insertion_sort(items, count):
    for i in range(1, count):
        item = items[i]
        j = i
        while j > 0 and items[j - 1] > item:
            items[j] = items[j - 1]
            j -= 1
        items[j] = item


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _order_by_value(items, count, order):
    """``order[:count]``: indices of ``items[:count]`` by value, ties by index (a stable argsort)."""
    if count > _SHORT:
        for i in range(count):
            order[i] = i
        _argsort_by(items, order, count)
        return
    for i in range(count):
        j = i
        while j > 0 and items[order[j - 1]] > items[i]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _argsort_by(keys, items, count):
    """Sort ``items[:count]`` (indices into ``keys``) by ``(keys[item], item)``: a heapsort, in place.

    Hand-written rather than ``np.argsort``, which compiles for seconds in numba.
    """
    for root in range(count // 2 - 1, -1, -1):
        _sift_down(keys, items, root, count)
    for end in range(count - 1, 0, -1):
        items[0], items[end] = items[end], items[0]
        _sift_down(keys, items, 0, end)


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _sift_down(keys, items, root, end):
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and _before(keys, items[child], items[child + 1]):
            child += 1
        if not _before(keys, items[root], items[child]):
            return
        items[root], items[child] = items[child], items[root]
        root = child


@njit(cache=True, inline="always", no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _before(keys, a, b):
    return keys[a] < keys[b] or (keys[a] == keys[b] and a < b)


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _grown(array, capacity):
    out = np.empty(capacity, dtype=array.dtype)
    for k in range(array.shape[0]):
        out[k] = array[k]
    return out
