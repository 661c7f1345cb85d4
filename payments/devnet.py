"""A local development chain: anvil with the escrow contracts deployed and test accounts funded.

:func:`up` starts anvil (from the npm package in ``node_modules``) in a session of its own, deploys
``TestUSDC``, ``HearthEscrow(token)`` and the provider registry ``HearthRegistry``, creates and funds the
node's wallet and a requester and a validator account, and writes the ``[chain]`` section and
``[market] registry`` of ``node.toml``. It is idempotent: when the anvil
recorded in ``<home>/devnet/anvil.pid`` still answers and the recorded contracts still have code, they are
reused and only the balances are topped up. :func:`stop` ends that anvil; its chain state is kept in
``<home>/devnet/state.json`` so the next :func:`up` finds the same contracts again.

The anvil process itself is :mod:`payments.devnet_anvil`'s, the editing of ``[chain]``
:mod:`payments.devnet_config`'s; their public names are re-exported here. Everything here speaks to anvil's
unlocked dev accounts; a real chain is configured by editing ``[chain]``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.exceptions import Web3Exception

from core.config import ChainSection, load_config, resolve_path
from core.defaults import DEFAULT_DEVNET_PORT, DEFAULT_WALLET_KEY_FILE
from core.errors import ConfigError
from payments.devnet_anvil import DEVNET_CHAIN_ID as DEVNET_CHAIN_ID
from payments.devnet_anvil import DEVNET_HOST as DEVNET_HOST
from payments.devnet_anvil import RPC_TIMEOUT_SECONDS, alive, terminate
from payments.devnet_anvil import connect as connect
from payments.devnet_anvil import find_anvil as find_anvil
from payments.devnet_anvil import spawn_anvil as spawn_anvil
from payments.devnet_config import CHAIN_TABLE_COMMENT as CHAIN_TABLE_COMMENT
from payments.devnet_config import set_chain_config as set_chain_config
from payments.devnet_config import set_market_registry as set_market_registry
from payments.devnet_config import write_atomically
from payments.escrow_build import load_artifact
from payments.keys import EthSigner, load_eth_key, new_eth, save_key

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
HOLD_POLL_SECONDS = 0.5

DEVNET_DIRNAME = "devnet"
PID_FILENAME = "anvil.pid"
STATE_FILENAME = "state.json"
LOG_FILENAME = "anvil.log"
DEPLOYMENT_FILENAME = "deployment.json"
REQUESTER_KEY_FILENAME = "requester.key"
VALIDATOR_KEY_FILENAME = "validator.key"

Role = Literal["node", "requester", "validator"]


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

    ``started`` says this call spawned anvil (else it found one running); ``reused`` says the token and
    escrow were already deployed there (a registry missing from an older deployment is added to it).
    """

    rpc_url: str
    chain_id: int
    token: str
    escrow: str
    registry: str
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


def up(home: Path, *, port: int = DEFAULT_DEVNET_PORT, join: Path | None = None) -> Devnet:
    """Start (or find) the devnet anvil, deploy (or reuse) the contracts, fund accounts, write ``[chain]``.

    anvil runs detached in its own session whatever the caller does next; :func:`stop` ends it.
    With ``join`` (another home whose devnet runs), ``home`` joins that devnet instead of starting one:
    same anvil, contracts, requester and validator accounts; its own node wallet is funded and its
    ``[chain]`` and ``[market] registry`` written (several local nodes on one chain, as a market demo
    needs). Only ``join``'s :func:`stop` ends that anvil.
    Raises :class:`ConfigError`: ``anvil_missing``, ``devnet_port_in_use``, ``devnet_rpc_unreachable``,
    ``devnet_anvil_exited``, ``devnet_rpc_failed``, ``devnet_deploy_failed``, ``devnet_not_running`` (nothing
    runs under ``join``), and the config and key-file codes.
    """
    cfg = load_config(home)  # an invalid node.toml is reported before anything starts
    if join is not None and join.resolve() == home.resolve():
        join = None
    folder = devnet_dir(home if join is None else join)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    rpc_url = f"http://{DEVNET_HOST}:{port}"
    pid = running_pid(home if join is None else join)
    started = pid is None
    if join is not None:
        rpc_url = str(_recorded_deployment(folder).get("rpc_url") or "")
        if pid is None or not rpc_url:
            raise ConfigError(
                "devnet_not_running",
                f"no devnet runs under {join}: start it with `hearth devnet --home {join} --detach`",
                details={"join": str(join)},
            )
        started = False
    elif pid is None:
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
            token, escrow, registry, reused = _deployment(w3, folder, rpc_url)
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
        set_market_registry(home, registry)
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
        registry=registry,
        pid=pid,
        started=started,
        reused=reused,
        config=str(config),
        accounts=accounts,
    )


def stop(home: Path) -> int | None:
    """Stop the devnet anvil recorded under ``home`` and return its pid; ``None`` if none was running.

    SIGTERM lets anvil dump its state; past :data:`~payments.devnet_anvil.ANVIL_STOP_TIMEOUT_SECONDS` it is
    killed.
    """
    pid = running_pid(home)
    if pid is not None:
        terminate(pid)
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
    while not stopping.wait(HOLD_POLL_SECONDS) and alive(pid):
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
    if pid > 0 and alive(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


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


def _deployment(w3: Web3, folder: Path, rpc_url: str) -> tuple[str, str, str, bool]:
    """(token, escrow, registry, reused): the recorded contracts if they still have code there, else fresh
    ones. ``reused`` speaks of the token and escrow; a registry missing from an older record is deployed
    next to them."""
    record = _recorded_deployment(folder)
    same_chain = record.get("rpc_url") == rpc_url
    token, escrow, registry = record.get("token"), record.get("escrow"), record.get("registry")
    deployer = w3.eth.accounts[0]
    reused = same_chain and _has_code(w3, token) and _has_code(w3, escrow)
    if not reused:
        token = _deploy(w3, deployer, "TestUSDC", TOKEN_NAME, deployer)
        escrow = _deploy(w3, deployer, "HearthEscrow", token)
    if not (reused and _has_code(w3, registry)):
        registry = _deploy(w3, deployer, "HearthRegistry")
    fresh = {
        "rpc_url": rpc_url,
        "chain_id": DEVNET_CHAIN_ID,
        "token": token,
        "escrow": escrow,
        "registry": registry,
    }
    if fresh != record:
        write_atomically(folder / DEPLOYMENT_FILENAME, json.dumps(fresh, indent=2) + "\n")
    return str(token), str(escrow), str(registry), bool(reused)


def _has_code(w3: Web3, address: object) -> bool:
    return isinstance(address, str) and bool(w3.eth.get_code(to_checksum_address(address)))


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


# -- files and keys ------------------------------------------------------------------------------------


def _spawn_detached(folder: Path, port: int) -> int:
    proc = spawn_anvil(port, state_file=folder / STATE_FILENAME, log=folder / LOG_FILENAME)
    write_atomically(folder / PID_FILENAME, f"{proc.pid}\n")
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
