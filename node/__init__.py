"""Hearth node: daemon, HTTP API, job journal, state machine, CLI."""
