"""The capacity ledger: which part of what the node offers is held right now, by whom, and until when.

Two kinds of hold, because a node on the internet is asked for quotes by people who pay nothing:

- **committed**: work someone stands behind — an accepted job on a node that takes no payments, or a
  job whose escrow funding is confirmed. Held until released; it takes precedence over everything else
  (a funded job is held even where that over-commits the ledger: the scheduler queues it).
- **unfunded**: a quote's hold, and an accepted job's while it waits for its funding. Anyone can make
  these with a throwaway ``did:key`` at the cost of one request, so they are bounded
  (:class:`HoldPolicy`): all unfunded holds together take at most ``unfunded_share`` of the total on each
  axis, one requester's at most ``per_requester_share``, and each lapses (the quote's expiry, the funding
  deadline).

A quote beyond those shares, or one that does not fit what is free right now, is still issued but holds
nothing (it is **over-quoted**): its acceptance goes through only if the capacity is free when it comes.
So an attacker with unlimited fresh DIDs can hold at most ``unfunded_share`` of the node; the rest stays
free for whoever accepts first, and a quote is refused (503) only when committed work leaves too little.
Fresh DIDs defeat any per-identity limit, which is why the total share is the bound that matters; the
per-requester share keeps one honest-but-greedy requester from taking all of it.

Pricing's surge reads :meth:`CapacityLedger.utilisation`, which counts committed holds only: quotes are
free to make, so letting them raise prices would let an attacker push the node's asks up for nothing.

Every refusal says when to retry (``details.retry_after_seconds``): when enough unfunded holds lapse for
the need to fit, or :attr:`HoldPolicy.busy_retry_seconds` where only committed work stands in the way
(jobs have no known end). Amounts are kept as running sums (CPU in integer thousandths, so totals never
drift through float error); expiries sit in a heap so :meth:`CapacityLedger.expire` touches only what
has expired. Not thread-safe: the ledger lives on the event loop.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from core.errors import CapacityError

# CPU shares are kept as integer thousandths so that running totals never drift through float error.
_MILLI = 1000
# The expiry heap is rebuilt when stale entries outnumber live holds by this factor (plus a small floor).
_HEAP_COMPACT_FACTOR = 2
_HEAP_COMPACT_FLOOR = 64

HoldKind = Literal["committed", "unfunded"]


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of CPU (cores, fractional), memory (MiB) and whole GPUs."""

    cpus: float = 0.0
    memory_mb: int = 0
    gpus: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.memory_mb + other.memory_mb, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.memory_mb - other.memory_mb, self.gpus - other.gpus)

    def fits(self, within: Resources) -> bool:
        """Whether this amount fits inside ``within`` on every axis."""
        return (
            _milli(self.cpus) <= _milli(within.cpus)
            and self.memory_mb <= within.memory_mb
            and self.gpus <= within.gpus
        )

    def clamp_zero(self) -> Resources:
        """This amount with any negative axis raised to zero."""
        return Resources(max(self.cpus, 0.0), max(self.memory_mb, 0), max(self.gpus, 0))

    def to_dict(self) -> dict[str, float | int]:
        return {"cpus": self.cpus, "memory_mb": self.memory_mb, "gpus": self.gpus}


def _milli(cpus: float) -> int:
    return round(cpus * _MILLI)


@dataclass(frozen=True, slots=True)
class HoldPolicy:
    """How much unfunded holds may take: shares of the total, on every axis (see the module docstring).

    ``unfunded_share`` bounds all unfunded holds together, ``per_requester_share`` one requester's (the
    smaller of the two applies to each requester). 1.0 and 1.0 bound nothing beyond the total; 0.0 makes
    every quote an over-quote. On an integer axis the share rounds down: half of one GPU is none, so a
    node's only GPU is never held by a quote, only by accepted work. ``busy_retry_seconds`` is the retry
    hint where only committed holds (which have no known end) stand in the way.
    """

    unfunded_share: float = 1.0
    per_requester_share: float = 1.0
    busy_retry_seconds: int = 30


@dataclass(frozen=True, slots=True)
class Hold:
    """One reservation: who holds it, how much, until when (None = until released), and of which kind.

    ``owner`` is the requester DID of an unfunded hold (its per-requester share), "" for a committed one.
    """

    key: str
    need: Resources
    expires_at: float | None
    kind: HoldKind = "committed"
    owner: str = ""


@dataclass(slots=True)
class _Tally:
    """A running sum of holds: CPU in thousandths, memory in MiB, GPUs, and how many holds."""

    mcpu: int = 0
    memory_mb: int = 0
    gpus: int = 0
    count: int = 0

    def add(self, need: Resources, sign: int) -> None:
        self.mcpu += sign * _milli(need.cpus)
        self.memory_mb += sign * need.memory_mb
        self.gpus += sign * need.gpus
        self.count += sign

    @classmethod
    def of(cls, amount: Resources) -> _Tally:
        tally = cls()
        tally.add(amount, +1)
        return tally

    def resources(self) -> Resources:
        return Resources(self.mcpu / _MILLI, self.memory_mb, self.gpus)

    def minus(self, other: _Tally) -> Resources:
        """This sum less ``other``, computed in thousandths so that no float error creeps in."""
        return Resources(
            (self.mcpu - other.mcpu) / _MILLI, self.memory_mb - other.memory_mb, self.gpus - other.gpus
        )

    def empty(self) -> bool:
        return self.count == 0


class CapacityLedger:
    """Running account of capacity held by quotes and jobs, O(1) per hold and release.

    :meth:`hold_unfunded` for quotes and acceptances awaiting funding, :meth:`commit` for work that is
    paid for (or needs no payment), :meth:`reserve` for a plain committed hold that must fit. Refusals are
    :class:`CapacityError`: ``exceeds_capacity`` (422, not retryable) for a need larger than everything
    the node offers, ``insufficient_capacity`` (503, retryable, with ``retry_after_seconds``) otherwise.
    """

    def __init__(self, total: Resources, policy: HoldPolicy | None = None) -> None:
        self._total = total
        self.policy = policy or HoldPolicy()
        self._holds: dict[str, Hold] = {}
        self._used = _Tally()
        self._unfunded = _Tally()
        self._by_owner: dict[str, _Tally] = {}
        self._expiries: list[tuple[float, str]] = []

    @property
    def total(self) -> Resources:
        return self._total

    def resize(self, total: Resources) -> None:
        """What the node offers changed (a cluster gained or lost a worker): holds stay as they are; what is
        free follows the new total (none, while holds exceed it)."""
        self._total = total

    def __contains__(self, key: object) -> bool:
        return key in self._holds

    def __len__(self) -> int:
        return len(self._holds)

    def get(self, key: str) -> Hold | None:
        return self._holds.get(key)

    # -- holding ----------------------------------------------------------------------------------------

    def hold_unfunded(
        self, key: str, owner: str, need: Resources, expires_at: float, *, now: float, must_fit: bool = False
    ) -> bool:
        """Hold ``need`` for ``owner`` until ``expires_at`` if the shares allow; returns whether it did.

        ``owner``'s own unfunded hold of ``need`` under ``key`` is kept whatever came since, with the new
        expiry (an accepted job's funding wait taking over its quote's hold); any other hold under ``key``
        is replaced. Returns False, holding nothing, for an over-quote: beyond the unfunded shares, or
        (unless ``must_fit``) not fitting what is free now. Raises ``exceeds_capacity`` for a need above
        the total, ``insufficient_capacity`` when committed work leaves too little for it — and, with
        ``must_fit`` (an acceptance), when it does not fit what is free now. A refusal changes nothing.
        """
        previous = self._holds.get(key)
        if (
            previous is not None
            and previous.kind == "unfunded"
            and (previous.owner, previous.need) == (owner, need)
        ):
            self.set_expiry(key, expires_at)
            return True
        with self._replacing(key):
            self._check_total(need)
            if not need.fits(self.reachable()):
                self._refuse(need, now)
            fits_now = need.fits(self.free())
            if must_fit and not fits_now:
                self._refuse(need, now)
        if not (fits_now and self._within_shares(owner, need)):
            return False
        self._insert(Hold(key, need, expires_at, "unfunded", owner))
        return True

    def commit(self, key: str, need: Resources, *, now: float, must_fit: bool = True) -> None:
        """Hold ``need`` under ``key`` until released, as committed work: the key's hold of ``need``
        turns into it, or a new hold is taken.

        With ``must_fit`` (an acceptance on a node without payments) a new hold must fit what is free now,
        else ``insufficient_capacity`` (or ``exceeds_capacity``) and nothing changes. Without it (funding
        just confirmed) the hold is taken whatever else is held: paid work takes precedence, and the
        scheduler queues what does not fit yet.
        """
        with self._replacing(key) as previous:
            if must_fit and (previous is None or previous.need != need):
                self._check_fits(need, now)
        self._insert(Hold(key, need, None))

    def reserve(
        self, key: str, need: Resources, expires_at: float | None, *, now: float | None = None
    ) -> None:
        """Hold ``need`` under ``key`` as committed work until ``expires_at`` (a Unix time) or released.

        Re-reserving a key replaces its hold (need and expiry) as one step, so a retry never holds twice.
        The need must fit what is free (``now`` makes the refusal's retry hint exact); a refusal changes
        nothing.
        """
        previous = self._holds.get(key)
        if previous is not None and previous.need == need and previous.kind == "committed":
            self.set_expiry(key, expires_at)
            return
        with self._replacing(key):
            self._check_fits(need, now)
        self._insert(Hold(key, need, expires_at))

    def restore(self, key: str, hold: Hold | None) -> None:
        """Put ``key`` back as it was (``hold`` from :meth:`get` earlier; None: nothing held), to undo a
        change whose journal write failed."""
        current = self._holds.get(key)
        if current is not None:
            self._remove(current)
        if hold is not None:
            self._insert(hold)

    def release(self, key: str) -> bool:
        """Drop the hold under ``key``; returns whether there was one (releasing twice is harmless)."""
        hold = self._holds.get(key)
        if hold is None:
            return False
        self._remove(hold)
        return True

    def set_expiry(self, key: str, expires_at: float | None) -> bool:
        """Change when ``key``'s hold lapses (its kind stays); ``None`` keeps it until released.

        Returns False, changing nothing, when nothing is held under ``key``.
        """
        hold = self._holds.get(key)
        if hold is None:
            return False
        if hold.expires_at != expires_at:
            self._holds[key] = Hold(key, hold.need, expires_at, hold.kind, hold.owner)
            self._push_expiry(key, expires_at)
        return True

    def expire(self, now: float) -> list[str]:
        """Release every hold whose ``expires_at`` is at or before ``now``; return their keys."""
        expired: list[str] = []
        while self._expiries and self._expiries[0][0] <= now:
            when, key = heapq.heappop(self._expiries)
            hold = self._holds.get(key)
            # Stale heap entries (released keys, changed expiries) are skipped here rather than searched for.
            if hold is not None and hold.expires_at == when:
                self._remove(hold)
                expired.append(key)
        return expired

    def load(self, rows: Iterable[tuple[str, Resources, float | None, str]]) -> None:
        """Replace the holds with ``(key, need, expires_at, owner)`` rows from the journal (at start).

        A row without an expiry (an accepted or running job) is committed and loaded as a fact, even if it
        over-commits a since-shrunk machine. A row with one (a live quote) is unfunded and held again only
        within what is free and the shares, earliest expiry first (rows of the same expiry in the order
        given): the journal does not record which quotes were over-quoted, and this is the rule they were
        held under. An empty ``owner`` counts the row as its own requester. A key given twice keeps its
        last row. Call :meth:`expire` afterwards.
        """
        self._holds.clear()
        self._expiries.clear()
        self._used, self._unfunded, self._by_owner = _Tally(), _Tally(), {}
        last = {key: (need, expires_at, owner or key) for key, need, expires_at, owner in rows}
        quotes: list[tuple[float, str, Resources, str]] = []
        for key, (need, expires_at, owner) in last.items():
            if expires_at is None:
                self._insert(Hold(key, need, None))
            else:
                quotes.append((expires_at, key, need, owner))
        for expires_at, key, need, owner in sorted(quotes, key=lambda row: row[0]):
            if need.fits(self.free()) and self._within_shares(owner, need):
                self._insert(Hold(key, need, expires_at, "unfunded", owner))

    # -- reading ----------------------------------------------------------------------------------------

    def holds(self) -> list[Hold]:
        return list(self._holds.values())

    def used(self) -> Resources:
        """Everything held, committed and unfunded."""
        return self._used.resources()

    def committed(self) -> Resources:
        return self._used.minus(self._unfunded)

    def unfunded(self) -> Resources:
        return self._unfunded.resources()

    def free_raw(self) -> Resources:
        """Total minus used; negative on an axis the journal (or funded work) over-committed."""
        return _Tally.of(self._total).minus(self._used)

    def free(self) -> Resources:
        """What a new hold may take now."""
        return self.free_raw().clamp_zero()

    def reachable(self) -> Resources:
        """Total minus committed: what a job could have once every unfunded hold lapsed."""
        return (self.free_raw() + self.unfunded()).clamp_zero()

    def utilisation(self, extra: Resources | None = None) -> float:
        """The busiest axis of committed work: max of committed/total over CPU, memory and GPU.

        Unfunded holds are left out on purpose: they cost nothing to make, so counting them would let
        anyone raise the surge factor, and with it every honest requester's price. With ``extra``, the
        utilisation as if it were also committed (what a new job would push load to); the result may then
        exceed 1.0. An axis with a zero total is left out.
        """
        load = self.committed() + (extra or Resources())
        ratios = [0.0]
        total_mcpu = _milli(self._total.cpus)
        if total_mcpu > 0:
            ratios.append(_milli(load.cpus) / total_mcpu)
        if self._total.memory_mb > 0:
            ratios.append(load.memory_mb / self._total.memory_mb)
        if self._total.gpus > 0:
            ratios.append(load.gpus / self._total.gpus)
        return max(ratios)

    def retry_after(self, need: Resources, now: float) -> int:
        """Whole seconds (at least 1) until ``need`` could fit: until enough holds with an expiry lapse,
        earliest first; :attr:`HoldPolicy.busy_retry_seconds` where lapses alone would not make room."""
        free = self.free_raw()
        if need.fits(free):
            return 1
        for hold in sorted((h for h in self._holds.values() if h.expires_at is not None), key=_expiry):
            free = free + hold.need
            if need.fits(free):
                assert hold.expires_at is not None
                return max(1, math.ceil(hold.expires_at - now))
        return self.policy.busy_retry_seconds

    def snapshot(self) -> dict[str, Any]:
        """The ledger as plain JSON data, for ``GET /v1/capacity``: ``used`` is ``committed`` (paid or
        accepted work) plus ``unfunded`` (quotes and jobs awaiting funding); ``utilisation`` is of
        committed work, as pricing sees it."""
        return {
            "total": self._total.to_dict(),
            "used": self.used().to_dict(),
            "free": self.free().to_dict(),
            "committed": self.committed().to_dict(),
            "unfunded": self.unfunded().to_dict(),
            "holds": len(self._holds),
            "utilisation": round(self.utilisation(), 6),
        }

    # -- internals --------------------------------------------------------------------------------------

    def _within_shares(self, owner: str, need: Resources) -> bool:
        policy = self.policy
        mine = self._by_owner.get(owner, _Tally())
        return self._under(self._unfunded, need, policy.unfunded_share) and self._under(
            mine, need, min(policy.per_requester_share, policy.unfunded_share)
        )

    def _under(self, tally: _Tally, need: Resources, share: float) -> bool:
        """Whether ``tally`` plus ``need`` stays within ``share`` of the total on every axis it asks for."""
        total = self._total
        return (
            tally.mcpu + _milli(need.cpus) <= math.floor(share * _milli(total.cpus))
            and tally.memory_mb + need.memory_mb <= math.floor(share * total.memory_mb)
            and tally.gpus + need.gpus <= math.floor(share * total.gpus)
        )

    @contextmanager
    def _replacing(self, key: str) -> Iterator[Hold | None]:
        """Take ``key``'s hold out (yielded) for the checks of its replacement; a refusal puts it back."""
        previous = self._holds.get(key)
        if previous is not None:
            self._remove(previous)
        try:
            yield previous
        except CapacityError:
            if previous is not None:
                self._insert(previous)
            raise

    def _check_fits(self, need: Resources, now: float | None) -> None:
        self._check_total(need)
        if not need.fits(self.free()):
            self._refuse(need, now)

    def _check_total(self, need: Resources) -> None:
        if not need.fits(self._total):
            raise CapacityError(
                "exceeds_capacity",
                "the job needs more than this node offers in total",
                details=self._details(need),
                retryable=False,
            )

    def _refuse(self, need: Resources, now: float | None) -> NoReturn:
        retry = self.policy.busy_retry_seconds if now is None else self.retry_after(need, now)
        raise CapacityError(
            "insufficient_capacity",
            f"not enough free capacity right now; retry in {retry} s",
            details={**self._details(need), "retry_after_seconds": retry},
            retryable=True,
        )

    def _details(self, need: Resources) -> dict[str, Any]:
        return {"need": need.to_dict(), "free": self.free().to_dict(), "total": self._total.to_dict()}

    def _insert(self, hold: Hold) -> None:
        self._holds[hold.key] = hold
        self._used.add(hold.need, +1)
        if hold.kind == "unfunded":
            self._unfunded.add(hold.need, +1)
            self._by_owner.setdefault(hold.owner, _Tally()).add(hold.need, +1)
        self._push_expiry(hold.key, hold.expires_at)

    def _remove(self, hold: Hold) -> None:
        del self._holds[hold.key]
        self._used.add(hold.need, -1)
        if hold.kind == "unfunded":
            self._unfunded.add(hold.need, -1)
            mine = self._by_owner[hold.owner]
            mine.add(hold.need, -1)
            if mine.empty():
                del self._by_owner[hold.owner]

    def _push_expiry(self, key: str, expires_at: float | None) -> None:
        if expires_at is None:
            return
        heapq.heappush(self._expiries, (expires_at, key))
        if len(self._expiries) > _HEAP_COMPACT_FACTOR * len(self._holds) + _HEAP_COMPACT_FLOOR:
            self._expiries = [(h.expires_at, h.key) for h in self._holds.values() if h.expires_at is not None]
            heapq.heapify(self._expiries)


def _expiry(hold: Hold) -> float:
    return hold.expires_at if hold.expires_at is not None else math.inf
