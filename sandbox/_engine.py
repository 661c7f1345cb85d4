"""The docker SDK, loaded on first use, and the engine calls that tolerate a container already gone."""

from __future__ import annotations

import contextlib
import functools
from typing import Any


@functools.cache
def sdk() -> Any:
    """The docker SDK, imported on first use: it is slow to import, and a node starts without it."""
    import docker
    import docker.errors
    import docker.types

    return docker


def remove(client: Any, container_id: str) -> None:
    """Kill and remove a container with its anonymous volumes; one that is gone already is no error."""
    with contextlib.suppress(sdk().errors.NotFound):
        client.api.remove_container(container_id, force=True, v=True)


def kill(client: Any, container_id: str) -> None:
    """Kill a running container; one that exited (or went) meanwhile is no error."""
    # 404/409: it exited (or went) on its own meanwhile, which is what killing it was for.
    with contextlib.suppress(sdk().errors.NotFound, sdk().errors.APIError):
        client.api.kill(container_id)


def close_stream(stream: Any) -> None:
    """Close an attach stream for good, the HTTP response under it included.

    ``CancellableStream.close()`` shuts the socket down but leaves the response's file object holding it;
    the descriptor would then be freed only by the garbage collector (with a ResourceWarning).
    """
    stream.close()
    response = getattr(stream, "_response", None)
    if response is not None:
        response.close()
