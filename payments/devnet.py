"""A local development chain: anvil with the escrow contracts deployed and test accounts funded.

:func:`up` starts anvil (from the npm package in ``node_modules``) in a session of its own, deploys
``TestUSDC`` and ``HearthEscrow(token)``, creates and funds the node's wallet and a requester and a
validator account, and writes the ``[chain]`` section of ``node.toml``. It is idempotent: when the anvil
recorded in ``<home>/devnet/anvil.pid`` still answers and the recorded contracts still have code, they are
reused and only the balances are topped up. :func:`stop` ends that anvil; its chain state is kept in
``<home>/devnet/state.json`` so the next :func:`up` finds the same contracts again.

Everything here speaks to anvil's unlocked dev accounts; a real chain is configured by editing ``[chain]``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import tomlkit
from eth_utils.address import to_checksum_address
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Table
from web3 import Web3
from web3.exceptions import Web3Exception

from core.config import CONFIG_FILENAME, ChainSection, load_config, parse_config, resolve_path
from core.defaults import DEFAULT_DEVNET_PORT, DEFAULT_WALLET_KEY_FILE
from core.errors import ConfigError
from payments.escrow_build import load_artifact
from payments.keys import EthSigner, load_eth_key, new_eth, save_key

REPO_ROOT = Path(__file__).resolve().parents[1]
ANVIL = REPO_ROOT / "node_modules" / ".bin" / "anvil"
DEVNET_CHAIN_ID = 31337
DEVNET_HOST = "127.0.0.1"
# anvil's well-known development mnemonic: every dev account (and so every address) is the same each run.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEVNET_CONFIRMATIONS = 1
# anvil mines a block per transaction: polling fast keeps the demo snappy at no cost
DEVNET_POLL_SECONDS = 0.25
TOKEN_NAME = "Test USDC"
USDC = 10**6  # one token in base units (6 decimals)
ETHER = 10**18
REQUESTER_USDC = 1000 * USDC
NODE_GAS_WEI = 10 * ETHER
REQUESTER_GAS_WEI = 10 * ETHER
VALIDATOR_GAS_WEI = 1 * ETHER
ANVIL_START_TIMEOUT_SECONDS = 20.0
ANVIL_STOP_TIMEOUT_SECONDS = 10.0
RPC_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.05
HOLD_POLL_SECONDS = 0.5
LOG_TAIL_BYTES = 2000

DEVNET_DIRNAME = "devnet"
PID_FILENAME = "anvil.pid"
STATE_FILENAME = "state.json"
LOG_FILENAME = "anvil.log"
DEPLOYMENT_FILENAME = "deployment.json"
REQUESTER_KEY_FILENAME = "requester.key"
VALIDATOR_KEY_FILENAME = "validator.key"

Role = Literal["node", "requester", "validator"]
# anvils this process spawned detached, by pid: polled to reap them once they exit.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
CHAIN_TABLE_COMMENT = (
    "Written by `hearth devnet`; for a real chain set the RPC URL and deployed addresses here."
)


@dataclass(frozen=True, kw_only=True)
class DevAccount:
    """One funded dev wallet: its role, DID, address and the key file (mode 0600) holding its key."""

    role: Role
    did: str
    address: str
    key_file: str


@dataclass(frozen=True, kw_only=True)
class Devnet:
    """A running devnet as :func:`up` left it.

    ``started`` says this call spawned anvil (else it found one running); ``reused`` says the contracts
    were already deployed there.
    """

    rpc_url: str
    chain_id: int
    token: str
    escrow: str
    pid: int
    started: bool
    reused: bool
    config: str
    accounts: tuple[DevAccount, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accounts"] = {
            a.role: {k: v for k, v in asdict(a).items() if k != "role"} for a in self.accounts
        }
        return data


def devnet_dir(home: Path) -> Path:
    """Where the devnet keeps anvil's pid, log and state, the deployment record and the test keys."""
    return home / DEVNET_DIRNAME


def up(home: Path, *, port: int = DEFAULT_DEVNET_PORT) -> Devnet:
    """Start (or find) the devnet anvil, deploy (or reuse) the contracts, fund accounts, write ``[chain]``.

    anvil runs detached in its own session whatever the caller does next; :func:`stop` ends it.
    Raises :class:`ConfigError`: ``anvil_missing``, ``devnet_port_in_use``, ``devnet_rpc_unreachable``,
    ``devnet_anvil_exited``, ``devnet_rpc_failed``, ``devnet_deploy_failed``, and the config and key-file
    codes.
    """
    cfg = load_config(home)  # an invalid node.toml is reported before anything starts
    folder = devnet_dir(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    rpc_url = f"http://{DEVNET_HOST}:{port}"
    pid = running_pid(home)
    started = pid is None
    if pid is None:
        pid = _spawn_detached(folder, port)
    elif _recorded_deployment(folder).get("rpc_url") not in (None, rpc_url):
        raise ConfigError(
            "devnet_already_running",
            f"a devnet anvil (pid {pid}) already runs on another port; stop it with `hearth devnet --stop`",
            details={"pid": pid, "rpc_url": _recorded_deployment(folder).get("rpc_url")},
        )
    try:
        w3 = connect(rpc_url, pid=pid, log=folder / LOG_FILENAME)
        with _rpc_errors(rpc_url):
            token, escrow, reused = _deployment(w3, folder, rpc_url)
            wallet_file = resolve_path(
                home, cfg.chain.wallet_key_file if cfg.chain else DEFAULT_WALLET_KEY_FILE
            )
            node = _eth_key(wallet_file)
            requester = _eth_key(folder / REQUESTER_KEY_FILENAME)
            validator = _eth_key(folder / VALIDATOR_KEY_FILENAME)
            _fund(
                w3,
                token,
                {
                    node.address: NODE_GAS_WEI,
                    requester.address: REQUESTER_GAS_WEI,
                    validator.address: VALIDATOR_GAS_WEI,
                },
                requester.address,
            )
        where = {
            "rpc_url": rpc_url,
            "chain_id": DEVNET_CHAIN_ID,
            "escrow": escrow,
            "token": token,
            "token_name": TOKEN_NAME,
        }
        # An existing [chain] keeps its operator-tuned knobs; only where the chain is changes.
        chain = (
            cfg.chain.model_copy(update=where)
            if cfg.chain is not None
            else ChainSection(
                **where,
                confirmations=DEVNET_CONFIRMATIONS,
                poll_seconds=DEVNET_POLL_SECONDS,
                wallet_key_file=DEFAULT_WALLET_KEY_FILE,
            )
        )
        config = set_chain_config(home, chain)
    except BaseException:
        if started:
            stop(home)  # leave nothing half-started behind
        raise
    accounts = (
        _account("node", node, wallet_file),
        _account("requester", requester, folder / REQUESTER_KEY_FILENAME),
        _account("validator", validator, folder / VALIDATOR_KEY_FILENAME),
    )
    return Devnet(
        rpc_url=rpc_url,
        chain_id=DEVNET_CHAIN_ID,
        token=token,
        escrow=escrow,
        pid=pid,
        started=started,
        reused=reused,
        config=str(config),
        accounts=accounts,
    )


def stop(home: Path) -> int | None:
    """Stop the devnet anvil recorded under ``home`` and return its pid; ``None`` if none was running.

    SIGTERM lets anvil dump its state; past :data:`ANVIL_STOP_TIMEOUT_SECONDS` it is killed.
    """
    pid = running_pid(home)
    if pid is not None:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + ANVIL_STOP_TIMEOUT_SECONDS
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(POLL_SECONDS)
    with contextlib.suppress(FileNotFoundError):
        (devnet_dir(home) / PID_FILENAME).unlink()
    return pid


@contextlib.contextmanager
def stop_requested() -> Iterator[threading.Event]:
    """While the block runs, SIGINT and SIGTERM set the yielded event instead of ending the process.

    Entered before anvil starts, so a signal at any moment (even while deploying) still lets the caller
    stop what it started.
    """
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def hold(pid: int, stopping: threading.Event) -> None:
    """Block until ``stopping`` is set (see :func:`stop_requested`) or the anvil ``pid`` exits."""
    while not stopping.wait(HOLD_POLL_SECONDS) and _alive(pid):
        pass


def running_pid(home: Path) -> int | None:
    """The pid in ``<home>/devnet/anvil.pid`` if that process is a live anvil; a stale file is removed."""
    pid_file = devnet_dir(home) / PID_FILENAME
    try:
        pid = int(pid_file.read_text().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and _alive(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


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
        if pid is not None and not _alive(pid):
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


def set_chain_config(home: Path, chain: ChainSection) -> Path:
    """Write ``chain`` as the ``[chain]`` table of ``<home>/node.toml``, keeping comments and formatting.

    An existing ``[chain]`` table is edited in place (its comments, and the layout of the keys whose values
    stay the same, are kept); otherwise a new one is appended. The result must parse to exactly the old
    document with the new chain and pass validation, else nothing is written (``config_not_editable``).
    """
    path = home / CONFIG_FILENAME
    text = path.read_text() if path.exists() else ""
    before = _toml(text, path)
    new_text = _with_chain_table(text, chain, path)
    try:
        after: dict[str, Any] | None = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        after = None
    expected = {k: v for k, v in before.items() if k != "chain"} | {"chain": chain.model_dump()}
    if after is None or after != expected:
        raise _not_editable(path)
    parse_config(after, source=str(path))
    _write_atomically(path, new_text)
    return path


# -- chain work ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rpc_errors(rpc_url: str) -> Iterator[None]:
    """Turns web3's and the transport's errors into ``ConfigError("devnet_rpc_failed")``."""
    try:
        yield
    except (Web3Exception, OSError, ValueError) as exc:
        raise ConfigError(
            "devnet_rpc_failed",
            f"the devnet at {rpc_url} failed a request: {exc}",
            details={"rpc_url": rpc_url},
            retryable=True,
        ) from exc


def _deployment(w3: Web3, folder: Path, rpc_url: str) -> tuple[str, str, bool]:
    """(token, escrow, reused): the recorded contracts if they still have code there, else fresh ones."""
    record = _recorded_deployment(folder)
    token, escrow = record.get("token"), record.get("escrow")
    if (
        record.get("rpc_url") == rpc_url
        and isinstance(token, str)
        and isinstance(escrow, str)
        and w3.eth.get_code(to_checksum_address(token))
        and w3.eth.get_code(to_checksum_address(escrow))
    ):
        return token, escrow, True
    deployer = w3.eth.accounts[0]
    token = _deploy(w3, deployer, "TestUSDC", TOKEN_NAME, deployer)
    escrow = _deploy(w3, deployer, "HearthEscrow", token)
    record = {"rpc_url": rpc_url, "chain_id": DEVNET_CHAIN_ID, "token": token, "escrow": escrow}
    _write_atomically(folder / DEPLOYMENT_FILENAME, json.dumps(record, indent=2) + "\n")
    return token, escrow, False


def _deploy(w3: Web3, deployer: str, name: str, *args: Any) -> str:
    art = load_artifact(name)
    tx = w3.eth.contract(abi=art.abi, bytecode=art.bytecode).constructor(*args).transact({"from": deployer})
    receipt = w3.eth.wait_for_transaction_receipt(tx, timeout=RPC_TIMEOUT_SECONDS)
    address = receipt["contractAddress"]
    if receipt["status"] != 1 or address is None:
        raise ConfigError("devnet_deploy_failed", f"deploying {name} reverted", details={"contract": name})
    return str(address)


def _fund(w3: Web3, token: str, gas_wei: dict[str, int], requester: str) -> None:
    """Tops each account up to its ETH amount and the requester up to :data:`REQUESTER_USDC`."""
    deployer = w3.eth.accounts[0]
    hashes = []
    for address, target in gas_wei.items():
        balance = w3.eth.get_balance(to_checksum_address(address))
        if balance < target:
            tx = {
                "from": deployer,
                "to": to_checksum_address(address),
                "value": w3.to_wei(target - balance, "wei"),
            }
            hashes.append(w3.eth.send_transaction(tx))  # type: ignore[arg-type]
    usdc = w3.eth.contract(address=to_checksum_address(token), abi=load_artifact("TestUSDC").abi)
    held = int(usdc.functions.balanceOf(requester).call())
    if held < REQUESTER_USDC:
        hashes.append(usdc.functions.mint(requester, REQUESTER_USDC - held).transact({"from": deployer}))
    for tx_hash in hashes:
        if w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RPC_TIMEOUT_SECONDS)["status"] != 1:
            raise ConfigError("devnet_funding_failed", "a funding transaction reverted", details={})


def _answers(w3: Web3) -> bool:
    try:
        return bool(w3.eth.chain_id == DEVNET_CHAIN_ID)
    except (Web3Exception, OSError, ValueError):  # connection refused while anvil starts
        return False


# -- files and processes -------------------------------------------------------------------------------


def _spawn_detached(folder: Path, port: int) -> int:
    proc = spawn_anvil(port, state_file=folder / STATE_FILENAME, log=folder / LOG_FILENAME)
    _write_atomically(folder / PID_FILENAME, f"{proc.pid}\n")
    return proc.pid


def _eth_key(path: Path) -> EthSigner:
    """The Ethereum key in ``path``, created (mode 0600) if it does not exist yet."""
    if not path.exists():
        save_key(new_eth(DEVNET_CHAIN_ID), path)
    return load_eth_key(path)


def _account(role: Role, signer: EthSigner, key_file: Path) -> DevAccount:
    return DevAccount(role=role, did=signer.did, address=signer.address, key_file=str(key_file))


def _recorded_deployment(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / DEPLOYMENT_FILENAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
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


def _signal_group(pid: int, sig: signal.Signals) -> None:
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


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, keeping an existing mode."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise ConfigError(
            "config_unwritable", f"cannot write {path}: {exc.strerror}", details={"path": str(path)}
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


# -- TOML ------------------------------------------------------------------------------------------------


def _toml(text: str, source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("invalid_toml", f"{source}: {exc}", details={"source": str(source)}) from None


def _with_chain_table(text: str, chain: ChainSection, path: Path) -> str:
    """``text`` with its ``[chain]`` table holding exactly ``chain``'s values; everything else as written.

    Only a plain ``[chain]`` table is edited: chain as an inline table, as dotted keys or as ``[chain.*]``
    tables alone is refused (``config_not_editable``).
    """
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError:  # what tomllib reads, tomlkit should too
        raise _not_editable(path) from None
    values = chain.model_dump()
    table = doc.get("chain")
    if table is None:  # appended after one blank line, under a comment saying where it came from
        head = text.rstrip("\n") + "\n\n" if text.strip() else ""
        return f"{head}# {CHAIN_TABLE_COMMENT}\n{tomlkit.dumps({'chain': values})}"
    if not isinstance(table, Table) or table.is_super_table():
        raise _not_editable(path)
    for key in [k for k in table if k not in values]:  # e.g. [chain.*] sub-tables: chain is replaced whole
        del table[key]
    for key, value in values.items():
        if key in table and table[key] != value:
            table[key] = value  # a replaced value keeps its line's comment
    # New keys go after the table's last key, indented like it, not after the comments that close the
    # table (those usually introduce the next one).
    body = table.value.body
    end = max((i + 1 for i, (key, _) in enumerate(body) if key is not None), default=0)
    for key, value in values.items():
        if key in table:
            continue
        item = tomlkit.item(value)
        if end:
            item.trivia.indent = body[end - 1][1].trivia.indent
        if end < len(body):
            table.value._insert_at(end, key, item)
        else:
            table.add(key, item)
        end += 1
    return tomlkit.dumps(doc)


def _not_editable(path: Path) -> ConfigError:
    return ConfigError(
        "config_not_editable",
        f"{path} defines chain outside a plain [chain] table; move it into one and re-run",
        details={"source": str(path)},
    )
