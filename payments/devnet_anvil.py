"""The devnet's anvil process: finding the executable, starting it, waiting for its RPC, stopping it.

anvil comes from the npm package in ``node_modules`` and runs on loopback in a session of its own, with
chain id 31337 and anvil's well-known dev mnemonic, so every dev account is the same each run. Only
processes that are anvil are ever signalled: a pid recycled by another program is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import signal
import socket
import subprocess
import time
from pathlib import Path

from web3 import Web3
from web3.exceptions import Web3Exception

from core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
ANVIL = REPO_ROOT / "node_modules" / ".bin" / "anvil"
DEVNET_CHAIN_ID = 31337
DEVNET_HOST = "127.0.0.1"
# anvil's well-known development mnemonic: every dev account (and so every address) is the same each run.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
ANVIL_START_TIMEOUT_SECONDS = 20.0
ANVIL_STOP_TIMEOUT_SECONDS = 10.0
RPC_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.05
LOG_TAIL_BYTES = 2000

# anvils this process spawned detached, by pid: polled to reap them once they exit.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def find_anvil() -> Path:
    """The anvil executable: the platform binary the npm package ships, else its node wrapper.

    Running the binary itself means the pid we record is anvil's own, so SIGTERM reaches the process
    that dumps the state. Raises ``ConfigError("anvil_missing")`` when neither is installed.
    """
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine(), platform.machine()
    )
    binary = REPO_ROOT / "node_modules" / "@foundry-rs" / f"anvil-{platform.system().lower()}-{arch}" / "bin"
    for candidate in (binary / "anvil", ANVIL):
        if candidate.exists():
            return candidate
    raise ConfigError(
        "anvil_missing",
        f"anvil is not installed at {ANVIL}; run `make setup`",
        details={"path": str(ANVIL)},
    )


def spawn_anvil(
    port: int, *, state_file: Path | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start anvil on loopback ``port`` in a session of its own (chain 31337, the dev mnemonic).

    With ``state_file`` the chain is loaded from it if present and dumped to it on exit.
    Raises ``devnet_port_in_use`` if something already listens on ``port``.
    """
    anvil = find_anvil()
    _check_port_free(port)
    argv = [str(anvil), "--host", DEVNET_HOST, "--port", str(port), "--chain-id", str(DEVNET_CHAIN_ID)]
    argv += ["--mnemonic", DEV_MNEMONIC, "--silent"]
    if state_file is not None:
        argv += ["--state", str(state_file)]
    try:
        with open(log if log is not None else os.devnull, "ab") as sink:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, start_new_session=True
            )
    except OSError as exc:
        raise ConfigError(
            "anvil_missing",
            f"cannot start anvil ({exc.strerror}); run `make setup`",
            details={"path": str(anvil)},
        ) from None
    _CHILDREN[proc.pid] = proc  # reaped (and never warned about) while this process lives
    return proc


def connect(
    rpc_url: str,
    *,
    pid: int | None = None,
    log: Path | None = None,
    timeout: float = ANVIL_START_TIMEOUT_SECONDS,
) -> Web3:
    """A web3 connection to the devnet at ``rpc_url`` once it answers with chain id 31337.

    With ``pid``, gives up early (``devnet_anvil_exited``, with the log's tail) if that process dies;
    otherwise ``devnet_rpc_unreachable`` after ``timeout`` seconds.
    """
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": RPC_TIMEOUT_SECONDS}))
    deadline = time.monotonic() + timeout
    while not _answers(w3):
        if pid is not None and not alive(pid):
            raise ConfigError(
                "devnet_anvil_exited",
                f"anvil (pid {pid}) exited before answering at {rpc_url}",
                details={"rpc_url": rpc_url, "log_tail": _tail(log)},
            )
        if time.monotonic() > deadline:
            raise ConfigError(
                "devnet_rpc_unreachable",
                f"no devnet RPC answered at {rpc_url} within {timeout:g}s",
                details={"rpc_url": rpc_url},
                retryable=True,
            )
        time.sleep(POLL_SECONDS)
    return w3


def terminate(pid: int) -> None:
    """End the anvil ``pid`` (with its session) and return once it is gone.

    SIGTERM lets anvil dump its state; past :data:`ANVIL_STOP_TIMEOUT_SECONDS` it is killed.
    """
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + ANVIL_STOP_TIMEOUT_SECONDS
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    if alive(pid):
        signal_group(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(POLL_SECONDS)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) anvil; reaps it first if this process started it."""
    child = _CHILDREN.get(pid)
    if child is not None:
        # Our own child: its exit status is the truth. Its cmdline is not, right after the fork: until
        # the exec it still reads as this Python process.
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    # A recycled pid belongs to some other program: never signal that.
    return state != "Z" and b"anvil" in cmdline


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the session anvil ``pid`` leads; one that is gone already is no error."""
    # anvil leads a session of its own, so the group also reaches the binary when the npm wrapper runs.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        # Like anvil's own listener: connections left in TIME_WAIT by a stopped devnet do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((DEVNET_HOST, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError("devnet_port_unusable", f"cannot use port {port}: {exc.strerror}") from None
            raise ConfigError(
                "devnet_port_in_use",
                f"port {port} is already in use; pick another with --port",
                details={"port": port},
            ) from None


def _tail(log: Path | None) -> str:
    if log is None:
        return ""
    try:
        return log.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
    except OSError:
        return ""


def _answers(w3: Web3) -> bool:
    try:
        return bool(w3.eth.chain_id == DEVNET_CHAIN_ID)
    except (Web3Exception, OSError, ValueError):  # connection refused while anvil starts
        return False
