"""A requester's side of the market, a roof of the house: what a person, script or agent uses to buy work.

Public face:

- :class:`requester.client.NodeClient` — the node's HTTP API as async calls; refusals are
  :class:`~requester.client.NodeError` (the node's structured error, with the HTTP status) and
  :class:`~requester.client.NodeUnreachable`; :func:`requester.client.sign_request` signs a request.
- :mod:`requester.paid` — a paid submission: the payer's wallet and the quoted escrow terms checked,
  the EIP-3009 authorization signed, the wait for the escrow to be funded.
- :mod:`requester.market` — the providers the on-chain registry lists whose signed offers bind to their
  listing (:func:`~requester.market.discover`: DID, payout wallet, endpoint, chain), each left out with a
  reason otherwise; :func:`~requester.market.fits` tells whether an offer can take an envelope.
- :mod:`requester.reputation` — providers' reputation read from the escrow's events on chain
  (:class:`~requester.reputation.ReputationCache`: jobs funded, released, refunded, USDC earned, distinct
  payers and validators), cached incrementally in SQLite and rescanned only from the last block read.
  :mod:`requester.escrow_events` decodes the escrow's raw logs for it.
- :func:`requester.routing.route` — one job routed among competing providers: quotes from every one that
  fits, the winner by strategy (:mod:`requester.routing_decision`: cheapest, or cheapest among the
  well-reputed), submitted with fallback on a definite refusal and retries on the same node when the
  outcome is unknown, so that one job is never funded at two nodes; the decision explains itself.
- :class:`requester.home.RequesterHome` — the requester home (SQLite): idempotency keys -> the job and the
  node it went to, routing decisions, local budgets (:mod:`requester.budgets`: per workflow, per UTC day,
  attempts per key) reserved before anything is signed; :func:`requester.home_route.route_once` routes a
  job through it (the same key returns the same job; a key cut off mid-routing resumes at its node only).
"""
