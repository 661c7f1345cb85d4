"""The provider's daemon, a roof of the house: what a GPU owner runs as a service.

Public face:

- :class:`node.daemon.Node` — the node's parts wired from its home (config, keys, journal, blockstore,
  sandbox, capacity, pricing, settlement), its start, reload, drain and stop.
- :func:`node.server.serve` / :func:`node.server.build_app` — the HTTP API (with :mod:`node.http_guard`'s
  connection limits and :mod:`node.http_errors`'s one error shape and status table).
- :func:`node.replay.replay_job` — a completed job run again to compare its artifact CID.
- :mod:`node.sdnotify` — systemd readiness, watchdog and status.

Inside: request intake (:mod:`node.intake`), admission (quote, accept, cancel), the scheduler and its
executors (transcode, inference), webhooks, the overview and metrics, the OpenAPI document.
"""
