"""The greedy planner's rules: one frozen object that travels from the caller to the kernel.

`GreedyRules()` is probe's default rule set, `GreedyRules.paper()` the paper's Algorithm 1;
docs/planner.md explains each rule and why probe's defaults differ from the paper's. The
object is validated once, here; `greedy_plan`, `greedy_ref`, `solve(..., "greedy",
rules=...)`, `plan_step`, the simulator and the CLI all take it as it is. (Importing this module
does not import Numba.)

>>> rules = GreedyRules()
>>> rules.k_max, rules.epsilon, [name for name, on in rules.flags.items() if on]
(16, 0.0, ['move_local', 'two_phase'])
>>> GreedyRules.paper(k_max=1).is_paper, GreedyRules.paper(k_max=1).k_max
(True, 1)
>>> GreedyRules(k_max="auto").max_moves(num_ranks=32)
64
>>> GreedyRules(k_max="scale").max_moves(num_ranks=64, num_experts=256)
320
>>> GreedyRules(k_max=-3)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: GreedyRules.k_max must be a non-negative int, None (unlimited), 'auto' or ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BUDGETS", "FLAG_NAMES", "GreedyRules"]

# The on/off rules, in the order the kernel takes them.
FLAG_NAMES = ("move_local", "evacuate", "two_phase", "mean_cap", "also_paper")
# The paper's Algorithm 1 as flags (its move budget is the default k_max, 16).
_PAPER_FLAGS = {"move_local": False, "evacuate": False, "two_phase": False, "mean_cap": True,
                "also_paper": False}
# k_max="auto": max(AUTO_MIN_MOVES, AUTO_MOVES_PER_RANK * G) moves. With more hot experts than
# ranks to drain (ep 16-32), 16 moves stop early (results/greedy_variants.md has the cost).
AUTO_MIN_MOVES = 16
AUTO_MOVES_PER_RANK = 2
# k_max="scale": max(AUTO_MIN_MOVES, AUTO_MOVES_PER_RANK * G, G + E): a move per rank to drain
# and a move per expert to split. At ep=64 / 256 experts the default decode load needs ~400
# moves to converge and "auto"'s 128 stop at IR 1.10-1.18 (results/scale.md has the numbers).
BUDGETS = ("auto", "scale")


@dataclass(frozen=True)
class GreedyRules:
    """Which rules the greedy follows (docs/planner.md, "The greedy's rules").

    Attributes:
        k_max: most moves: an int >= 0 (0: until no move gains; None is taken as 0), "auto"
            (max(16, 2G) for G ranks) or "scale" (max(16, 2G, G + E) for G ranks and E
            experts: grows with the experts too). Default 16, the paper's fixed budget.
        epsilon: least gain of a move, seconds (finite, >= 0).
        move_local: the slowest rank's own tokens join the pool of movable tokens, last
            (rule 4). Off in the paper.
        evacuate: also try moving every token of the expert off the slowest rank, which drops
            its alpha (rule 6). Off by default and in the paper.
        two_phase: with move_local, search the amount over the other sources' tokens first,
            then over the slowest rank's own (rule 6). Off in the paper.
        mean_cap: stop a move where the slowest rank reaches the mean rank time (rule 6). On
            in the paper, off by default.
        also_paper: also run the paper's rules and keep that plan when strictly better (rule 8;
            the greedy runs twice). Off by default and in the paper.
    """

    k_max: int | str | None = 16
    epsilon: float = 0.0
    move_local: bool = True
    evacuate: bool = False
    two_phase: bool = True
    mean_cap: bool = False
    also_paper: bool = False

    def __post_init__(self) -> None:
        k_max = self.k_max
        if k_max is None:
            k_max = 0
        elif not (isinstance(k_max, str) and k_max in BUDGETS):
            if (isinstance(k_max, (bool, np.bool_)) or not isinstance(k_max, (int, np.integer))
                    or k_max < 0):
                raise ValueError(f"GreedyRules.k_max must be a non-negative int, None "
                                 f"(unlimited), 'auto' or 'scale', got {k_max!r}")
            k_max = int(k_max)
        object.__setattr__(self, "k_max", k_max)
        epsilon = self.epsilon
        if isinstance(epsilon, (bool, np.bool_)) or not isinstance(
                epsilon, (int, float, np.integer, np.floating)):
            raise TypeError(f"GreedyRules.epsilon must be a number of seconds, got {epsilon!r}")
        epsilon = float(epsilon)
        if not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"GreedyRules.epsilon must be finite and >= 0 seconds, got "
                             f"{epsilon!r}")
        object.__setattr__(self, "epsilon", epsilon)
        for name in FLAG_NAMES:
            flag = getattr(self, name)
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"GreedyRules.{name} must be a bool, got {flag!r}")
            object.__setattr__(self, name, bool(flag))

    @classmethod
    def paper(cls, **changes) -> GreedyRules:
        """The paper's Algorithm 1 (k_max 16), with `changes` (fields) applied on top."""
        return cls(**{**_PAPER_FLAGS, **changes})

    @property
    def flags(self) -> dict[str, bool]:
        """The on/off rules by name, in FLAG_NAMES order."""
        return {name: getattr(self, name) for name in FLAG_NAMES}

    @property
    def is_paper(self) -> bool:
        """True when each move follows the paper's rules (the flags of rules 4 and 6 are the
        paper's; k_max, epsilon and also_paper aside)."""
        return all(getattr(self, name) == flag for name, flag in _PAPER_FLAGS.items()
                   if name != "also_paper")

    def max_moves(self, num_ranks: int, num_experts: int | None = None) -> int:
        """k_max as the kernel takes it for `num_ranks` ranks and `num_experts` experts (needed
        by "scale" only): 0 = unlimited, "auto" and "scale" resolved."""
        if self.k_max == "auto":
            return max(AUTO_MIN_MOVES, AUTO_MOVES_PER_RANK * int(num_ranks))
        if self.k_max == "scale":
            if num_experts is None:
                raise ValueError("GreedyRules.max_moves: k_max='scale' needs num_experts")
            return max(AUTO_MIN_MOVES, AUTO_MOVES_PER_RANK * int(num_ranks),
                       int(num_ranks) + int(num_experts))
        return self.k_max
