"""GET /v1/jobs/{id}/events on a long job: every event reaches the stream, a page at a time, in order.

A running job journals its progress every second, so a job of an hour holds thousands of events. The
stream (backlog and follow mode alike) must deliver all of them, the final transition last, and resume
after any position, including one in the middle of a page of the journal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from core.journal import Event, Journal
from payments.keys import Signer
from tests.conftest import LiveNode, make_envelope

LONG = 2_500  # progress events of the long job: more than any single read of the journal returns
BURST = 1_500  # events committed at once while a stream follows: more than a subscriber's queue holds
ALL = 100_000  # the tests' own reads of the journal take every event of the job


async def running_job(ln: LiveNode, requester: Signer) -> str:
    """A job quoted and accepted through the API, then started (the scheduler of the test node is paused)."""
    async with ln.client() as c:
        q = await c.quote(ln.sign(requester, {"job": make_envelope()}))
        await c.submit(ln.sign(requester, {"job": make_envelope()}), q["jwt"])
    job: str = q["job"]["id"]
    ln.node.journal.transition(job, "running", actor="node", reason="started", expect="accepted")
    return job


async def journal_progress(journal: Journal, job: str, count: int, *, finish: bool = False) -> None:
    """``count`` progress events (one group commit), then, with ``finish``, the job's completion."""
    async with journal.batched():
        for i in range(count):
            journal.append_event(job, "progress", f"transcode {i}", {"stage": "transcode", "i": i})
        if finish:
            journal.transition(job, "completed", actor="node", reason="done", expect="running")


async def long_finished_job(ln: LiveNode, requester: Signer) -> tuple[str, list[Event]]:
    job = await running_job(ln, requester)
    await journal_progress(ln.node.journal, job, LONG, finish=True)
    events = ln.node.journal.events(job, limit=ALL)
    assert len(events) == 4 + LONG + 1  # created, priced, accepted, running; the progress; completed
    return job, events


async def sse(
    ln: LiveNode, job: str, *, follow: bool, after: int | None = None, last_event_id: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The stream's events, each checked to be well formed: ``id`` is its seq, ``event`` its type."""
    query = {"follow": "true" if follow else "false"}
    if after is not None:
        query["after"] = str(after)
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{ln.url}/v1/jobs/{job}/events", params=query, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "text/event-stream"
        fields: dict[str, str] = {}
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                continue  # a keepalive
            if line:
                name, _, value = line.partition(": ")
                assert name in ("id", "event", "data") and name not in fields, line
                fields[name] = value
                continue
            assert fields.get("event") != "error", fields
            event: dict[str, Any] = orjson.loads(fields["data"])
            assert (int(fields["id"]), fields["event"]) == (event["seq"], event["type"])
            yield event
            fields = {}
        assert not fields, "the stream ended inside an event"


def as_sent(events: list[Event]) -> list[dict[str, Any]]:
    return [e.as_dict() for e in events]


@pytest.mark.parametrize("follow", [False, True], ids=["backlog", "follow"])
async def test_a_long_finished_job_streams_every_event(
    live_node: LiveNode, requester: Signer, follow: bool
) -> None:
    job, events = await long_finished_job(live_node, requester)
    seen = [e async for e in sse(live_node, job, follow=follow)]
    assert seen == as_sent(events)
    assert [e["seq"] for e in seen] == sorted({e["seq"] for e in seen})  # in order, none twice
    assert (seen[-1]["type"], seen[-1]["to"]) == ("transition", "completed")


@pytest.mark.parametrize("follow", [False, True], ids=["backlog", "follow"])
@pytest.mark.parametrize("how", ["after", "last-event-id"])
async def test_resuming_in_the_middle_of_a_page(
    live_node: LiveNode, requester: Signer, follow: bool, how: str
) -> None:
    job, events = await long_finished_job(live_node, requester)
    for cut in (1, 1_234, 2_001, len(events) - 2):  # not on a boundary of any page size that divides 1000
        position = events[cut - 1].seq
        if how == "after":
            stream = sse(live_node, job, follow=follow, after=position)
        else:  # the header wins over the query
            stream = sse(live_node, job, follow=follow, after=0, last_event_id=position)
        seen = [e async for e in stream]
        assert seen == as_sent(events[cut:]), cut
        assert seen[-1]["to"] == "completed"
    assert [e async for e in sse(live_node, job, follow=follow, after=events[-1].seq)] == []


@pytest.mark.parametrize("backlog", [0, LONG], ids=["short-backlog", "long-backlog"])
async def test_follow_delivers_a_burst_larger_than_its_queue(
    live_node: LiveNode, requester: Signer, backlog: int
) -> None:
    journal = live_node.node.journal
    job = await running_job(live_node, requester)
    await journal_progress(journal, job, backlog)
    before = journal.events(job, limit=ALL)
    seen: list[dict[str, Any]] = []

    async def follow() -> None:
        async for event in sse(live_node, job, follow=True, after=before[1].seq):  # from 'accepted' on
            seen.append(event)

    task = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(5):
            while len(seen) < len(before) - 2:  # the backlog has arrived: the stream now follows
                assert not task.done(), "the stream ended while the job runs"
                await asyncio.sleep(0.01)
        assert seen == as_sent(before[2:])
        # one commit of more events than a subscriber's queue holds, the job's completion last
        await journal_progress(journal, job, BURST, finish=True)
        await asyncio.wait_for(task, 5)  # the stream ends after the completion
    finally:
        task.cancel()
    events = journal.events(job, limit=ALL)
    assert len(events) == 4 + backlog + BURST + 1
    assert seen == as_sent(events[2:])
    assert (seen[-1]["type"], seen[-1]["to"]) == ("transition", "completed")
