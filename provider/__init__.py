"""Hearth provider: capacity discovery, policy, work estimation and pricing."""
