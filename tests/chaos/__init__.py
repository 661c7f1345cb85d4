"""The fault scoreboard: long fault runs (``make chaos``) and their short versions in ``make test``.

Each scenario lives in a ``scenario_*.py`` module and registers itself with
:func:`tests.chaos.scoreboard.scenario`; ``python -m tests.chaos`` runs them at their stated counts and
prints the table, and ``tests/chaos/test_short.py`` runs each at its short count under pytest.
"""
