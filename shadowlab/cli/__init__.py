"""The command line, `python -m shadowlab ...`: argument parsing and the drivers of each command.
"""
