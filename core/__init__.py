"""Hearth's ground floor: what every other package stands on. It imports no other Hearth package.

Public face (import the module you need; nothing is loaded here):

- :mod:`core.errors` — the one error tree (:class:`~core.errors.HearthError` and its families), each error
  a code, a failure domain, ``retryable`` and details; the node's HTTP boundary picks the status.
- :mod:`core.config` — ``node.toml`` as typed sections, validated at start, ``HEARTH_<SECTION>__<KEY>``
  overrides; :mod:`core.defaults` names every default a node runs with.
- :mod:`core.envelope` — the job envelopes (``ffmpeg_transcode``, ``vllm_batch``), their JCS canonical form
  and hashes, node job ids.
- :mod:`core.lifecycle` — job states, the allowed transitions and the state groupings every floor uses.
- :mod:`core.journal` — the durable SQLite journal of jobs, events, nonces, payments, transactions and
  webhooks, behind one :class:`~core.journal.Journal` whose group commits span them all.
- :mod:`core.logs` — JSON or text logging with job and trace ids, and the repeat limiter.
- :mod:`core.faults` — fault points: named places where tests may stop the process (no-op in production).
- :mod:`core.untrusted` — bounded parsing of untrusted JSON (depth, integer range, finite floats,
  duplicate members), the one parser every boundary that takes a stranger's bytes uses.
- :mod:`core.netpolicy` — the address policy for every URL a stranger names (https inputs, callbacks):
  :class:`~core.netpolicy.AddressPolicy` judges hosts as written and as resolved, and its connector
  connects only to the addresses it checked; refusals are :class:`~core.netpolicy.AddressNotAllowed`.
- :mod:`core.sqlitefile` — :func:`~core.sqlitefile.open_wal`, how the side files beside the journal (the
  requester home, the reputation cache, the validator's verdicts) open SQLite.
"""
