"""What "fits the window" means, once for the checker and every solver.

A rank's weight copies fit its window when their transfer seconds add up to at most
`window_limit(window)` = window x (1 + WINDOW_REL) + WINDOW_ABS: the slack absorbs the
floating-point error of summing transfer times, nothing more. check.py judges plans with it;
milp.py, lp.py, cpsat.py and highs.py filter copies and bound their window rows with it, so a plan
a solver accepts is a plan the checker accepts, and the reverse.

>>> bool(fits_window(1.0 + 5e-10, 1.0)), bool(fits_window(1.0 + 2e-9, 1.0))
(True, False)
"""

from __future__ import annotations

import numpy as np

__all__ = ["WINDOW_ABS", "WINDOW_REL", "fits_window", "window_limit"]

# Relative slack for floating-point sums of transfer seconds compared with a window.
WINDOW_REL = 1e-9
# Absolute slack (seconds), so that a zero window still accepts a copy of zero seconds.
WINDOW_ABS = 1e-15


def window_limit(window):
    """The most transfer seconds that fit `window` (seconds; a number or an array)."""
    return np.asarray(window, dtype=np.float64) * (1 + WINDOW_REL) + WINDOW_ABS


def fits_window(seconds, window):
    """Whether transfers of `seconds` fit `window` (numbers or broadcastable arrays: bool)."""
    return np.asarray(seconds, dtype=np.float64) <= window_limit(window)
