"""Every exercise by id ("01.1" ... "07.5"): ``CHECKERS`` and ``check(id, answer, ...)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shadowlab.lab.exercises import lesson01, lesson02, lesson03, lesson04, lesson05, lesson06, lesson07
from shadowlab.lab.grading import Feedback

CHECKERS: dict[str, Callable[..., Feedback]] = {
    f"{name[6:8]}.{name[9:]}": getattr(module, name)
    for module in (lesson01, lesson02, lesson03, lesson04, lesson05, lesson06, lesson07)
    for name in sorted(vars(module)) if name.startswith("check_0")
}


def check(exercise: str, answer: Any, *args: Any, reveal: bool = False, **kwargs: Any) -> Feedback:
    """Run the checker of ``exercise`` ("01.1" ... "07.5") on ``answer`` and the evidence it takes; reveal=True
    returns the full feedback (``Feedback.reveal``: the expected answer and why) even for a wrong answer."""
    if exercise not in CHECKERS:
        raise ValueError(f"exercise={exercise!r} is unknown; accepted: {', '.join(CHECKERS)}")
    fb = CHECKERS[exercise](answer, *args, **kwargs)
    return fb.reveal() if reveal else fb
