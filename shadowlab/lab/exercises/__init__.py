"""Self-checks for the lessons' exercises: one checker per exercise, answering right / wrong / why.

Every checker takes the student's ``answer`` first and the evidence it needs (the model and images, or the result
objects the lesson already computed). Where the exercise asks the student to run an experiment, the checker takes
that run (02.1, 02.3, 04.1, 04.2, 04.3, 05.x, 06.x) and validates it (present, non-empty, made at the settings the
exercise asks for, and where cheap its numbers against one recomputed point or forward pass) instead of rerunning it;
otherwise it recomputes the correct answer with the project's own code. Where the answer is a choice among a few
options (01.3, 01.4, 02.2, 02.4, 04.4, 04.5, 05.3, 05.4, 06.2, 06.5), it also takes the numbers the choice rests on
and compares them with that recomputation (``grading.check_evidence``), so a typed guess without them is refused.
It returns a ``Feedback``: ``correct`` (None while the answer is still ``None``), a message (the explanation when
right, a hint that keeps the key hidden when wrong: ``Feedback.reveal()`` shows it) and ``expected``. Answers of
the wrong type (a string where a bool is asked, a bool where a count is asked) raise TypeError naming the answer.
A lesson's exercise cell reads ``check_01_1(answer, model, x, y)``; its solutions notebook asserts the worked answer.
``CHECKERS`` maps exercise ids ("01.1", ...) to the checkers; ``check(id, answer, ...)`` dispatches.

One module per lesson (``lesson01`` ... ``lesson07``), each holding its exercises' checkers; ``catalog`` maps
exercise ids to them. A lesson imports its module as ``exercises`` and calls ``exercises.check_XX_K``. The checkers
read the shared grading helpers through their module: ``grading.pending``, ``grading.verdict``, ``grading.as_number``,
``grading.check_evidence``, ``grading.Feedback`` ...
"""
