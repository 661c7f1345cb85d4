"""Hearth sandbox: hardened container runner and workloads."""
