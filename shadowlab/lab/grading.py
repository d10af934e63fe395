"""What every exercise checker shares: the verdict (``Feedback``: right / wrong / why, with the key hidden
until asked for), and the checks of a student's answer, which reject a wrong type with a clear error (a string
where a bool is asked, a bool where a count is asked)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PENDING = "no answer yet: set `answer` in the cell above and run it again"


@dataclass
class Feedback:
    """A checker's verdict: correct (None = not answered), a message, and the expected answer (None while pending).

    A wrong answer's message is a hint that never states the expected answer or the measurements that give it away;
    ``reveal()`` (or ``check(..., reveal=True)``) returns the full feedback: the expected answer and why.
    """

    exercise: str
    correct: bool | None
    message: str
    expected: Any = None
    explanation: str = ""

    def __bool__(self) -> bool:
        return bool(self.correct)

    def __str__(self) -> str:
        mark = {True: "RIGHT", False: "NOT YET RIGHT", None: "UNANSWERED"}[self.correct]
        return f"exercise {self.exercise}: {mark}. {self.message}"

    __repr__ = __str__

    def reveal(self) -> Feedback:
        """The same verdict with the expected answer and the measurements behind it in the message."""
        if self.correct is None or not self.explanation:
            return self
        head = "" if self.correct else f"expected {self.expected!r}. "
        return Feedback(self.exercise, self.correct, head + self.explanation, self.expected, self.explanation)


HIDDEN = ("compare your run with the exercise's question once more (its settings, every image, every model). "
          "To see the expected answer and the measurements behind it: `print(fb.reveal())` on this feedback, or "
          "`exercises.check(id, answer, ..., reveal=True)`.")


def pending(exercise: str, hint: str) -> Feedback:
    return Feedback(exercise, None, f"{PENDING}. Hint: {hint}")


def verdict(exercise: str, ok: bool, expected: Any, why: str, answer: Any) -> Feedback:
    """RIGHT with the explanation, or NOT YET RIGHT with a hint that keeps the expected answer hidden."""
    message = why if ok else f"you answered {answer!r}: not this. Hint: {HIDDEN}"
    return Feedback(exercise, bool(ok), message, expected, why)


def as_number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}={value!r} must be a finite number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def as_bool(name: str, value: Any) -> bool:
    """A yes/no answer: True or False (NumPy and 0-d torch booleans too); anything else, the string "False"
    included, is refused with a clear error instead of being read by its truthiness."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} must be True or False, got {type(value).__name__}")
    return bool(value)


def as_count(name: str, value: Any) -> int:
    """A count: an integer >= 0 (a bool is refused, a float only when it is whole, as 3.0)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}={value!r} must be a whole number >= 0, got {type(value).__name__}")
    if not math.isfinite(float(value)) or float(value) != int(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a whole number >= 0")
    return int(value)


def as_tuple(name: str, value: Any, length: int, what: str) -> tuple[Any, ...]:
    """A tuple (or list) of ``length`` items; the error says it must be a ``what`` (e.g. "tuple (low, high)")."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (tuple, list)) or len(value) != length:
        raise TypeError(f"{name}={value!r} must be a {what}")
    return tuple(value)


def as_mapping(name: str, value: Any, keys: Sequence[Any]) -> dict[Any, Any]:
    """A dict whose keys are exactly ``keys``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}={value!r} must be a dict with keys {list(keys)}")
    if set(value) != set(keys):
        raise ValueError(f"{name} must have exactly the keys {list(keys)}, got {list(value)}")
    return dict(value)


def same_kind(value: Any, accepted: Any) -> bool:
    """A string matches only a string, a number only a number (never a bool: True == 1 in Python)."""
    if isinstance(accepted, str):
        return isinstance(value, str)
    if isinstance(value, (bool, np.bool_)):
        return isinstance(accepted, bool)
    return True


def as_choice(name: str, value: Any, accepted: Sequence[Any]) -> Any:
    if not any(same_kind(value, a) and value == a for a in accepted):
        raise ValueError(f"{name}={value!r} is not one of the accepted answers: {', '.join(map(repr, accepted))}")
    return value


# ================================================================================================ lesson 04
def final_term(res: Any, term: str) -> float:
    return float(res.history[term][-1])
