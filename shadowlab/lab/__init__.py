"""The teaching side: the Shadow Attack lab widget, lesson helpers, exercise checkers, student and instructor builds,
slides and the static site.
"""
