"""The ``hearth`` command, the top roof: one module per audience, each adding its subcommands.

Public face: :func:`cli.main.main` (the entry point, also ``python -m cli``), :func:`cli.main.build_parser`.
Operators: :mod:`cli.operator`, :mod:`cli.service`, :mod:`cli.status`, :mod:`cli.models`; requesters:
:mod:`cli.requester`; validators: :mod:`cli.validator`; developers: :mod:`cli.devnet`. :mod:`cli.common`
holds the exit codes and the output for people or machines (``--json``).
"""
