"""Model plumbing shared by the MILP (milp.py), the LP heuristic (lp.py) and the HiGHS backend.

`Rows` collects linear rows in coordinate form, block by block; `highs_lp` turns column data and
such rows into a highspy.HighsLp; `new_highs` makes a HiGHS instance that prints nothing unless
asked (verbose=True). highspy is imported only inside the functions that need it.

HiGHS prints its banner ("Running HiGHS ...") to standard output from the first `highspy.Highs()`
of a process, before any option can be set; `new_highs` sends that one construction's output to
/dev/null (file descriptor 1, under a lock), so that no solve writes to the terminal by default.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import numpy as np

__all__ = ["Rows", "highs_lp", "new_highs", "time_unit"]


def time_unit(objective: float) -> float:
    """Seconds per model time unit: `objective` (e.g. a warm start's) maps to about 1000 units."""
    return objective / 1000.0 if objective > 0 else 1.0


class Rows:
    """Linear rows in coordinate form, added in blocks; each row has a bound pair and a family.

    >>> rows = Rows()
    >>> rows.add([0, 0, 1], [0, 1, 1], 1.0, -np.inf, [4.0, 2.0])  # x0 + x1 <= 4, x1 <= 2
    >>> rows.add([0], [0], 2.0, 1.0, np.inf, family=1)  # 2 x0 >= 1
    >>> lower, upper, family, row, col, val = rows.arrays()
    >>> rows.count, row.tolist(), upper.tolist(), family.tolist()
    (3, [0, 0, 1, 2], [4.0, 2.0, inf], [0, 0, 1])
    """

    def __init__(self) -> None:
        self.lower: list[np.ndarray] = []
        self.upper: list[np.ndarray] = []
        self.family: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.count = 0

    def add(self, row, col, val, lower, upper, *, family: int = 0) -> None:
        """Add k rows: `row` int [NNZ] holds block-local row ids 0..k-1, `col` int [NNZ] the
        columns, `val` float [NNZ] (or a scalar) the coefficients; lower and upper float [k]
        (or scalars, broadcast; +-inf where open), k = the larger of their sizes."""
        lower = np.atleast_1d(np.asarray(lower, dtype=np.float64))
        upper = np.atleast_1d(np.asarray(upper, dtype=np.float64))
        k = max(lower.size, upper.size)
        if k == 0:
            return
        self.lower.append(np.broadcast_to(lower, (k,)))
        self.upper.append(np.broadcast_to(upper, (k,)))
        self.family.append(np.full(k, family, np.int8))
        self.rows.append(np.asarray(row, np.int64) + self.count)
        self.cols.append(np.asarray(col, np.int64))
        self.vals.append(np.broadcast_to(np.asarray(val, np.float64), np.shape(col)))
        self.count += k

    def arrays(self):
        """row_lower, row_upper float64 [M], row_family int8 [M], and the coefficients
        (row int64, col int64, val float64 [NNZ])."""
        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return (cat(self.lower, np.float64), cat(self.upper, np.float64),
                cat(self.family, np.int8), cat(self.rows, np.int64), cat(self.cols, np.int64),
                cat(self.vals, np.float64))

    def lp(self, col_cost: np.ndarray, col_lower: np.ndarray, col_upper: np.ndarray):
        """These rows as a highspy.HighsLp minimising col_cost (see `highs_lp`)."""
        lower, upper, _, row, col, val = self.arrays()
        return highs_lp(col_cost, col_lower, col_upper, lower, upper, row, col, val)


def highs_lp(col_cost: np.ndarray, col_lower: np.ndarray, col_upper: np.ndarray,
             row_lower: np.ndarray, row_upper: np.ndarray, coef_row: np.ndarray,
             coef_col: np.ndarray, coef_val: np.ndarray,
             integrality: np.ndarray | None = None):
    """A highspy.HighsLp (minimise) from numpy arrays: float [N] column data, float [M] row
    bounds (+-inf allowed), coordinate coefficients [NNZ] without duplicates (zeros are dropped)
    and optionally bool [N] integrality."""
    import highspy

    inf = highspy.kHighsInf
    keep = coef_val != 0
    coef_row, coef_col, coef_val = coef_row[keep], coef_col[keep], coef_val[keep]
    num_cols = col_cost.size
    order = np.lexsort((coef_row, coef_col))
    starts = np.zeros(num_cols + 1, np.int32)
    np.cumsum(np.bincount(coef_col, minlength=num_cols), out=starts[1:])
    lp = highspy.HighsLp()
    lp.num_col_ = num_cols
    lp.num_row_ = row_lower.size
    lp.col_cost_ = col_cost
    lp.col_lower_ = np.clip(col_lower, -inf, inf)
    lp.col_upper_ = np.clip(col_upper, -inf, inf)
    lp.row_lower_ = np.clip(row_lower, -inf, inf)
    lp.row_upper_ = np.clip(row_upper, -inf, inf)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = starts
    lp.a_matrix_.index_ = coef_row[order].astype(np.int32)
    lp.a_matrix_.value_ = coef_val[order]
    if integrality is not None:
        lp.integrality_ = np.where(integrality, highspy.HighsVarType.kInteger,
                                   highspy.HighsVarType.kContinuous).tolist()
    return lp


_BANNER_LOCK = threading.Lock()
_banner_absorbed = False


@contextlib.contextmanager
def _stdout_to_devnull():
    """Send file descriptor 1 (C-level standard output) to /dev/null inside the block."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # no C library handle (e.g. Windows): flush Python's buffers only
        libc = None
    sys.stdout.flush()
    if libc is not None:
        libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        if libc is not None:
            libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _construct():
    """highspy.Highs(), the process's first one with its banner sent to /dev/null."""
    global _banner_absorbed
    import highspy

    if not _banner_absorbed:
        with _BANNER_LOCK:
            if not _banner_absorbed:
                try:
                    with _stdout_to_devnull():
                        solver = highspy.Highs()
                except OSError:  # no file descriptor 1 to redirect: nothing can print either
                    solver = highspy.Highs()
                _banner_absorbed = True
                return solver
    return highspy.Highs()


def new_highs(time_limit: float | None = None, *, verbose: bool = False, **options):
    """A highspy.Highs with a time limit (seconds; None: none) and `options` set; it prints
    nothing unless verbose (then HiGHS logs to standard output as usual)."""
    import highspy

    solver = highspy.Highs() if verbose else _construct()
    solver.setOptionValue("output_flag", bool(verbose))
    if time_limit is not None:
        solver.setOptionValue("time_limit", max(float(time_limit), 1e-3))
    for key, value in options.items():
        solver.setOptionValue(key, value)
    return solver
