"""The operator's views of the journal: recent jobs, an attempt's progress, failures and earnings.

Read by the overview (GET /v1/overview, the dashboard, `hearth status`), which is polled every second or
two: each reads a handful of rows through an index, or only the failed or settled jobs.
"""

from __future__ import annotations

import math
from typing import Any

from core.journal.engine import JournalEngine
from core.journal.records import Event, JobRecord, _event, _job
from core.journal.schema import _EVENT_COLUMNS, _JOB_COLUMNS
from core.lifecycle import JobState

__all__ = ["OverviewStore"]


class OverviewStore(JournalEngine):
    """Reads for the operator's overview; they write nothing."""

    def recent_jobs(self, limit: int = 20, *, state: JobState | None = None) -> list[JobRecord]:
        """The ``limit`` jobs recorded last, newest first; with ``state``, only those now in it.

        Rows are never deleted, so the rowid is the order of creation and the newest ``limit`` rows are read
        from its end, whatever the journal's size.
        """
        where = "" if state is None else " WHERE state = ?"
        params: tuple[Any, ...] = (limit,) if state is None else (state, limit)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY rowid DESC LIMIT ?", params
            ).fetchall()
        return [_job(row) for row in rows]

    def attempt_progress(self, job: str) -> Event | None:
        """The latest progress event of job ``job``'s current attempt; None before the attempt reports any.

        Reads the job's events backwards to its latest progress event or ``running`` transition, whichever
        comes first: the first, usually, since a running attempt reports about once a second.
        """
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE job = ? AND (type = 'progress' OR "
                "(type = 'transition' AND to_state = 'running')) ORDER BY seq DESC LIMIT 1",
                (job,),
            ).fetchone()
        return None if row is None or row[3] != "progress" else _event(row)

    def failure_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs rest in ``failed``, by ``(failure domain, failure code)`` ("" for a missing code)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT failure_domain, coalesce(failure_code, ''), COUNT(*) FROM jobs "
                "WHERE state = 'failed' GROUP BY 1, 2"
            ).fetchall()
        return {(str(domain), str(code)): int(n) for domain, code, n in rows}

    def settled_earnings(self, since: float, period_seconds: int) -> dict[float, tuple[int, int]]:
        """Base units earned and jobs settled per period since ``since``: ``{period start: (units, jobs)}``.

        Periods are multiples of ``period_seconds`` since the epoch (UTC hours or days); only periods with a
        settled job appear. A job counts, with its receipt's amount as in :meth:`payment_totals`, in the
        period it settled: ``settled`` is terminal, so the row's ``updated_at`` is that moment.
        """
        if period_seconds <= 0:
            raise ValueError(f"period_seconds must be positive, not {period_seconds}")
        periods: dict[float, tuple[int, int]] = {}
        with self._read() as conn:
            rows = conn.execute(
                "SELECT j.updated_at, json_extract(p.receipt_json, '$.receipt.amount') FROM jobs j "
                "JOIN payments p ON p.job = j.id WHERE j.state = 'settled' AND j.updated_at >= ?",
                (since,),
            ).fetchall()
        for at, amount in rows:
            start = float(math.floor(at / period_seconds) * period_seconds)
            units, jobs = periods.get(start, (0, 0))
            periods[start] = (units + int(amount or 0), jobs + 1)
        return periods
