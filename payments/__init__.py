"""Hearth payments: DIDs, keys and signatures (DID-JWT); escrow client and contracts later."""
