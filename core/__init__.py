"""Hearth's ground floor: pieces every other package stands on, importing no other Hearth package.

Public face:

- :mod:`core.untrusted` — bounded parsing of untrusted JSON (depth, integer range, finite floats,
  duplicate members), the one parser every boundary that takes a stranger's bytes uses.
- :mod:`core.netpolicy` — the address policy for every URL a stranger names (https inputs, callbacks):
  :class:`~core.netpolicy.AddressPolicy` judges hosts as written and as resolved, and its connector
  connects only to the addresses it checked; refusals are :class:`~core.netpolicy.AddressNotAllowed`.
"""
