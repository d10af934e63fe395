"""What every exercise checker shares: the verdict (``Feedback``: right / wrong / why, with the key hidden
until asked for), and the checks of a student's answer, which reject a wrong type with a clear error (a string
where a number or a bool is asked, a bool where a count is asked) and accept a number in its natural forms (a
Python or NumPy scalar, a 0-d tensor).

Student mode (``student_mode()``: the student build of ``make assignments``, ``$SHADOWLAB_STUDENT=1``, or a copy of
the package carrying ``STUDENT_MARKER``): a checker's ``Feedback`` holds no expected answer and, for a wrong answer,
no explanation; ``reveal()`` and ``check(..., reveal=True)`` raise ``KeyUnavailable``. The verdict itself
(``correct``) is the same in both modes."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PENDING = "no answer yet: set `answer` in the cell above and run it again"
# a file of this name beside this module marks a copy of the package as the students' (assignments.student_package)
STUDENT_MARKER = Path(__file__).with_name("STUDENT_BUILD")
_student: bool | None = None


def student_mode(on: bool | None = None) -> bool:
    """Whether checkers hide the key; ``student_mode(True)`` turns it on for this process (the student notebook's
    first cell does), ``student_mode(False)`` off unless the package itself is a student copy."""
    global _student
    if on is not None:
        _student = bool(on)
    if STUDENT_MARKER.exists() or os.environ.get("SHADOWLAB_STUDENT", "").lower() in ("1", "true", "yes"):
        return True
    return bool(_student)


class KeyUnavailable(RuntimeError):
    """Raised by ``Feedback.reveal`` in student mode: the student build carries no expected answers."""


STUDENT_HINT = ("compare your run with the exercise's question once more (its settings, every image, every model). "
                "This build gives verdicts and hints, not the expected answers.")


@dataclass
class Feedback:
    """A checker's verdict: correct (None = not answered), a message, and the expected answer (None while pending,
    and always None in student mode).

    A wrong answer's message is a hint that never states the expected answer or the measurements that give it away;
    ``reveal()`` (or ``check(..., reveal=True)``) returns the full feedback: the expected answer and why, except in
    student mode, where it raises ``KeyUnavailable``.
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
        if student_mode():
            raise KeyUnavailable(f"exercise {self.exercise}: the student build carries no expected answers; the "
                                 "verdict and its hint are all it gives")
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
    """RIGHT with the explanation, or NOT YET RIGHT with a hint that keeps the expected answer hidden (in student
    mode the feedback holds neither the expected answer nor, when wrong, the explanation)."""
    if student_mode():
        if ok:
            return Feedback(exercise, True, why, None, why)
        return Feedback(exercise, False, f"you answered {answer!r}: not this. Hint: {STUDENT_HINT}")
    message = why if ok else f"you answered {answer!r}: not this. Hint: {HIDDEN}"
    return Feedback(exercise, bool(ok), message, expected, why)


def _scalar(value: Any) -> Any:
    """A 0-d tensor or NumPy array (or a one-element NumPy scalar) as its Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def as_number(name: str, value: Any) -> float:
    """A number: int or float (a NumPy scalar or a 0-d tensor too); a bool or a string is refused."""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}={value!r} must be a finite number, got {type(value).__name__}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(v)


def as_bool(name: str, value: Any) -> bool:
    """A yes/no answer: True or False (NumPy and 0-d torch booleans too); anything else, the string "False"
    included, is refused with a clear error instead of being read by its truthiness."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype == np.bool_:
        return bool(value)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} must be True or False, got {type(value).__name__}")
    return bool(value)


def as_count(name: str, value: Any) -> int:
    """A count: an integer >= 0 (a NumPy integer or a 0-d tensor too; a bool is refused, a float only when it is
    whole, as 3.0)."""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}={value!r} must be a whole number >= 0, got {type(value).__name__}")
    if not math.isfinite(float(v)) or float(v) != int(v) or v < 0:
        raise ValueError(f"{name}={value!r} must be a whole number >= 0")
    return int(v)


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


def as_numbers(name: str, value: Any, length: int | None = None) -> list[float]:
    """A list of numbers (a list, tuple, NumPy array or tensor; a single number when ``length`` is None or 1 is
    taken as one item), each as ``as_number``; ``length``, when given, is how many there must be."""
    if isinstance(value, (str, bytes, Mapping)):
        raise TypeError(f"{name}={value!r} must be a finite number or a list of finite numbers, got "
                        f"{type(value).__name__}")
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must hold {length} number(s), got {len(items)}")
    return [as_number(f"{name}[{i}]" if len(items) > 1 else name, v) for i, v in enumerate(items)]


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (Mapping, list, tuple)) and not value)


def as_evidence(name: str, value: Any, keys: Sequence[Any], what: str) -> dict[Any, Any]:
    """The student's own computations behind an answer, one per key: a dict with exactly ``keys`` (``what`` says
    what each holds). Missing or empty evidence (a typed guess without the work) is refused with a ValueError."""
    if _empty(value):
        raise ValueError(f"{name} is empty: do the exercise's computation first and keep its results in {name} "
                         f"({{{', '.join(map(repr, keys))}: {what}}}); the answer is graded with the work")
    return as_mapping(name, value, keys)


def check_evidence(name: str, value: Any, computed: Any, what: str, how: str, tol: float = 1e-6) -> None:
    """Validate the student's computed values ``value`` against the checker's own recomputation ``computed``: a
    dict {key: a number or a list of numbers} (``value`` must have the same keys and lengths), or a number or a list
    of numbers (``value`` the same).

    Raises ValueError when the evidence is missing or empty (a typed guess without the work), has other keys or
    lengths, or an entry differs from the recomputation by more than ``tol`` (absolute, relative above 1): the
    message names the entry, says what it holds (``what``) and what it must come from (``how``); TypeError for a
    string or a bool where a number is asked.
    """
    if isinstance(computed, Mapping):
        given = as_evidence(name, value, list(computed), what)
        entries = [(f"{name}[{k!r}]", given[k], want) for k, want in computed.items()]
    elif _empty(value):
        raise ValueError(f"{name} is empty: do the exercise's computation first and keep its result in {name} "
                         f"({what}); the answer is graded with the work")
    else:
        entries = [(name, value, computed)]
    for label, got_value, want in entries:
        expect = as_numbers(label, want)
        got = as_numbers(label, got_value, len(expect))
        if any(abs(g - w) > tol * max(1.0, abs(w)) for g, w in zip(got, expect)):
            shown = got[0] if len(got) == 1 else got
            raise ValueError(f"{label} = {shown!r} is not what {how} gives: compute it on the exercise's model, "
                             "images and settings")


def require_run(name: str, res: Any, **wanted: Any) -> Any:
    """The run an exercise asks for (a result object with a ``config``): refused with a ValueError naming ``name`` when
    it is missing or was made at other settings than ``wanted`` (config fields)."""
    if res is None or not hasattr(res, "config"):
        raise ValueError(f"{name} must be the run the exercise asks for (a ShadowResult), got {res!r}: run it first")
    for key, value in wanted.items():
        got = getattr(res.config, key)
        if got != value:
            raise ValueError(f"{name} must be run with {key}={value!r}, as the exercise asks; it has {key}={got!r}")
    return res


# ================================================================================================ lesson 04
def final_term(res: Any, term: str) -> float:
    return float(res.history[term][-1])
