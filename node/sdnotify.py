"""systemd's readiness protocol (``sd_notify``), spoken by hand: one datagram to ``$NOTIFY_SOCKET``.

Used by ``hearth run`` under the ``Type=notify`` unit in ``systemd/``: ``READY=1`` once the API answers,
``STATUS=`` lines for ``systemctl status``, ``RELOADING=1`` around SIGHUP, ``STOPPING=1`` when draining
starts, and ``WATCHDOG=1`` pings from the event loop. The protocol is a few ``KEY=VALUE`` lines in a
Unix datagram; libsystemd is not needed for it. Without ``$NOTIFY_SOCKET`` (not run by systemd) every
call is a no-op.

The environment is read once, at the CLI boundary (:meth:`ServiceEnv.from_environ`); this module is given
the values.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

log = logging.getLogger("hearth.sdnotify")

# STATUS= (what `systemctl status` shows) is refreshed at least this often.
STATUS_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEnv:
    """What the service manager told the process through its environment (``systemd.exec(5)``).

    ``notify_socket``: where notifications go (a path, or ``@name`` in the abstract namespace).
    ``watchdog_usec``: the unit's WatchdogSec=, when the watchdog is meant for this process.
    ``credentials_dir``: ``$CREDENTIALS_DIRECTORY``, where LoadCredential= put the keys.
    """

    notify_socket: str | None = None
    watchdog_usec: int | None = None
    credentials_dir: Path | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, pid: int) -> ServiceEnv:
        """Read the variables; raise ``ConfigError`` (``invalid_service_env``) for values systemd never sets.

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or ``pid`` (sd_watchdog_enabled's rule):
        a child that inherited the variables must not ping for its parent.
        """
        watchdog: int | None = None
        raw = environ.get("WATCHDOG_USEC")
        owner = environ.get("WATCHDOG_PID")
        if raw and (not owner or owner == str(pid)):
            if not raw.isdigit() or int(raw) == 0:
                raise ConfigError(
                    "invalid_service_env",
                    f"WATCHDOG_USEC must be a positive integer of microseconds, not {raw!r}",
                    details={"variable": "WATCHDOG_USEC"},
                )
            watchdog = int(raw)
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            raise ConfigError(
                "invalid_service_env",
                f"NOTIFY_SOCKET must be a socket path or an @abstract name, not {address!r}",
                details={"variable": "NOTIFY_SOCKET"},
            )
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        return cls(
            notify_socket=address,
            watchdog_usec=watchdog,
            credentials_dir=Path(credentials) if credentials else None,
        )

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half the timeout, as systemd recommends; None without one."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000


class Notifier:
    """Sends notifications to the service manager; a no-op without an address.

    A notification that cannot be sent is logged, never raised: the node works on whether or not the
    manager hears it (systemd then acts on its own timeouts).
    """

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        if address is not None:
            # '@name' is the abstract namespace, which the kernel spells with a leading NUL byte.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> None:
        """One datagram of ``KEY=VALUE`` lines (values must not contain newlines)."""
        if self._address is None or not lines:
            return
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._failed:  # once: a manager that went away would otherwise flood the log
                log.warning("cannot notify the service manager at %r: %s", self._address, exc)
                self._failed = True
            return
        self._failed = False

    def ready(self, status: str) -> None:
        self.send("READY=1", _status(status))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this to the reload it asked for.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", _status(status))

    def status(self, status: str) -> None:
        self.send(_status(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line, whatever the text held


async def keepalive(
    notifier: Notifier, status: Callable[[], str], *, watchdog_interval: float | None
) -> None:
    """Ping the watchdog and refresh ``STATUS=`` (when it changed) until cancelled, every
    ``watchdog_interval`` (half the timeout) or STATUS_INTERVAL_SECONDS, whichever is shorter.

    It runs on the event loop on purpose: a loop that is blocked stops pinging, and systemd restarts the
    service after WatchdogSec=. Without a watchdog it only keeps STATUS= current.
    """
    interval = min(watchdog_interval or STATUS_INTERVAL_SECONDS, STATUS_INTERVAL_SECONDS)
    shown: str | None = None
    while True:
        lines = ["WATCHDOG=1"] if watchdog_interval else []
        text = status()
        if text != shown:
            lines.append(_status(text))
            shown = text
        notifier.send(*lines)
        await asyncio.sleep(interval)
