"""Test-only contracts and the local-chain (anvil) helpers the contract tests share."""
