"""``hearth install-service``: set this machine up to run Hearth under systemd (``systemd/hearth.service``).

As root, idempotently: the ``hearth`` system user (in group ``docker``, whose socket the daemon drives),
``/etc/hearth`` (0750 root:hearth: node.toml 0640, the keys 0600 root's, handed over as systemd
credentials) and ``/var/lib/hearth`` (0700 hearth:hearth: journal, blocks, attempt folders), a node.toml
from the template ``hearth init`` writes, the node key, and the unit in ``/etc/systemd/system`` with
ExecStart pointing at the ``hearth`` of the Python running this command. A second run changes nothing
(a changed unit template is written again). ``systemctl daemon-reload`` runs only where systemd runs;
elsewhere the command prints what to run. ``--root DIR`` does all of it under DIR (tests, image builds);
``--dry-run`` reports without touching anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cli.common import EXIT_OK, Out
from cli.operator import NODE_TOML_TEMPLATE
from core.config import CONFIG_FILENAME, parse_config
from core.defaults import DEFAULT_HOST, DEFAULT_NODE_NAME, DEFAULT_PORT
from core.errors import ConfigError
from payments.keys import KEY_FILE_MODE, load_key, new_ed25519, save_key

SERVICE_USER = "hearth"
DOCKER_GROUP = "docker"
CONFIG_DIR = Path("/etc/hearth")
STATE_DIR = Path("/var/lib/hearth")
UNIT_PATH = Path("/etc/systemd/system/hearth.service")
NODE_KEY_PATH = CONFIG_DIR / "node.key"  # the unit's LoadCredential= sources
WALLET_KEY_PATH = CONFIG_DIR / "wallet.key"
CONFIG_DIR_MODE = 0o750
STATE_DIR_MODE = 0o700
CONFIG_FILE_MODE = 0o640
UNIT_FILE_MODE = 0o644
# The unit template: in the source tree next to the packages (like scripts/demo.sh for `hearth demo`).
PACKAGE_DIR = Path(__file__).resolve().parent
UNIT_TEMPLATE = PACKAGE_DIR.parent / "systemd" / "hearth.service"
SYSTEMD_RUNNING_MARKER = Path("/run/systemd/system")  # sd_booted()'s test
# ProtectHome=yes hides these from the service: a `hearth` installed there cannot start.
HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))
_EXEC_START = re.compile(r"^ExecStart=(\S+)", re.MULTILINE)


class ServiceInstallError(ConfigError):
    """Raised when ``install-service`` cannot set the service up: not root, Docker's group missing, the
    ``hearth`` entry point where the hardened unit cannot reach it, or useradd failing.

    Raised before the step that needs what is missing; steps already done stay done (a re-run resumes).
    """


@dataclass(frozen=True, slots=True)
class Step:
    """One thing install-service made sure of; ``changed``: it was (or, with --dry-run, would be) changed."""

    what: str
    path: str
    changed: bool
    detail: str


@dataclass(slots=True)
class Plan:
    """Where to install, and what was done so far."""

    root: Path
    dry_run: bool
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def at(self, path: Path) -> Path:
        """``path`` (absolute, as the service sees it) under the install root."""
        return self.root / path.relative_to("/")

    def step(self, what: str, path: Path, changed: bool, detail: str) -> bool:
        """Record a step; True when it is to be carried out now (it changes something, not a dry run)."""
        self.steps.append(Step(what, str(path), changed, detail))
        return changed and not self.dry_run


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``install-service`` to ``hearth``'s subcommands."""
    p = subparsers.add_parser(
        "install-service", help="set up the hearth user, /etc/hearth, /var/lib/hearth and the systemd unit"
    )
    p.add_argument("--root", type=Path, default=Path("/"), help="install under this directory (default /)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="API port of a new node.toml")
    p.add_argument("--host", default=DEFAULT_HOST, help="API address of a new node.toml")
    p.add_argument("--name", default=DEFAULT_NODE_NAME, help="node name of a new node.toml")
    p.set_defaults(func=cmd_install_service)
    return p


def cmd_install_service(args: argparse.Namespace, out: Out) -> int:
    plan = Plan(root=args.root.resolve(), dry_run=args.dry_run)
    if not plan.dry_run and os.geteuid() != 0:
        raise ServiceInstallError(
            "must_be_root", "install-service creates a user and root's files; run it as root"
        )
    hearth = entry_point()
    hidden = hidden_from_service(hearth)
    if hidden and plan.root == Path("/"):  # the unit would fail with 203/EXEC; under --root, only warn
        raise ServiceInstallError(
            "entry_point_hidden",
            f"{'; '.join(hidden)}: install Hearth (and the Python it runs on) elsewhere, e.g. a venv in "
            "/opt/hearth, and run install-service from there",
            details={"problems": hidden},
        )
    plan.warnings.extend(hidden)
    ensure_user(plan)
    uid, gid = _ids(plan, SERVICE_USER)
    ensure_dir(plan, CONFIG_DIR, CONFIG_DIR_MODE, 0, gid)
    ensure_dir(plan, STATE_DIR, STATE_DIR_MODE, uid, gid)
    template = NODE_TOML_TEMPLATE.format(
        name=args.name, host=args.host, port=args.port, key_file=str(NODE_KEY_PATH)
    )
    parse_config(tomllib.loads(template), source="node.toml template")  # never write what the node refuses
    ensure_file(plan, CONFIG_DIR / CONFIG_FILENAME, template, CONFIG_FILE_MODE, 0, gid, replace=False)
    did = ensure_node_key(plan)
    if plan.at(WALLET_KEY_PATH).exists():
        ensure_owner(plan, WALLET_KEY_PATH, KEY_FILE_MODE, 0, 0)
    unit_changed = ensure_file(plan, UNIT_PATH, render_unit(hearth), UNIT_FILE_MODE, 0, 0, replace=True)
    report = finish(plan, hearth, did, unit_changed)
    out.emit(report, lambda: _print(report))
    return EXIT_OK


# -- steps --------------------------------------------------------------------------------------------


def entry_point() -> Path:
    """The ``hearth`` script next to the running interpreter (its venv), else the one on PATH.

    Refused when its path holds whitespace (ExecStart= would need quoting).
    """
    candidate = Path(sys.executable).parent / "hearth"
    if not os.access(candidate, os.X_OK):
        found = shutil.which("hearth")
        if found is None:
            raise ServiceInstallError(
                "entry_point_missing",
                f"no `hearth` script next to {sys.executable} or on PATH; install Hearth first",
            )
        candidate = Path(found)
    candidate = candidate.absolute()
    if re.search(r"\s", str(candidate)):
        raise ServiceInstallError(
            "entry_point_path", f"the path {candidate} holds whitespace", details={"path": str(candidate)}
        )
    return candidate


def hidden_from_service(hearth: Path) -> list[str]:
    """What the service needs to start ``hearth`` but cannot see: the script, the interpreter behind it,
    Python's standard library or Hearth's code under a directory the unit's ProtectHome=yes hides."""
    needed = (hearth, Path(sys.executable).resolve(), Path(sys.base_prefix), PACKAGE_DIR)
    return [
        f"{path} is under {hidden}, which the unit's ProtectHome=yes hides from the service"
        for path in needed
        for hidden in HIDDEN_BY_PROTECT_HOME
        if path.is_relative_to(hidden)
    ]


def ensure_user(plan: Plan) -> None:
    """The ``hearth`` system user with its own group, in group ``docker`` (which must exist: Docker's)."""
    groups = _table(plan, "group")
    if DOCKER_GROUP not in groups:
        raise ServiceInstallError(
            "docker_group_missing",
            f"there is no `{DOCKER_GROUP}` group in {plan.at(Path('/etc/group'))}: install Docker first "
            "(scripts/docker.sh); the service reaches its socket through that group",
        )
    prefix = [] if plan.root == Path("/") else ["--prefix", str(plan.root)]
    if SERVICE_USER not in _table(plan, "passwd"):
        detail = f"system user, groups {SERVICE_USER},{DOCKER_GROUP}, no login, home {STATE_DIR}"
        if plan.step("user", Path(SERVICE_USER), True, detail):
            _run(
                "useradd",
                *prefix,
                "--system",
                "--user-group",
                "--groups",
                DOCKER_GROUP,
                "--home-dir",
                str(STATE_DIR),
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "Hearth provider node",
                SERVICE_USER,
            )
        return
    members = groups[DOCKER_GROUP][2].split(",")
    in_docker = SERVICE_USER in members
    detail = f"exists, in group {DOCKER_GROUP}" if in_docker else f"exists; added to group {DOCKER_GROUP}"
    if plan.step("user", Path(SERVICE_USER), not in_docker, detail):
        _run("usermod", *prefix, "--append", "--groups", DOCKER_GROUP, SERVICE_USER)


def ensure_dir(plan: Plan, path: Path, mode: int, uid: int, gid: int) -> None:
    target = plan.at(path)
    if not target.is_dir():
        if plan.step("directory", path, True, f"created, {_perm(plan, mode, uid, gid)}"):
            target.mkdir(parents=True, mode=mode)
            _set_owner(target, mode, uid, gid)
        return
    ensure_owner(plan, path, mode, uid, gid)


def ensure_file(plan: Plan, path: Path, text: str, mode: int, uid: int, gid: int, *, replace: bool) -> bool:
    """``path`` with ``text`` (kept as it is when it exists, unless ``replace``), mode and owner; changed?"""
    target = plan.at(path)
    if target.exists() and (not replace or target.read_text() == text):
        return ensure_owner(plan, path, mode, uid, gid)
    detail = "written again (the template changed)" if target.exists() else "created"
    if plan.step("file", path, True, f"{detail}, {_perm(plan, mode, uid, gid)}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(text)
        _set_owner(temporary, mode, uid, gid)
        os.replace(temporary, target)
    return True


def ensure_owner(plan: Plan, path: Path, mode: int, uid: int, gid: int) -> bool:
    """Mode and owner of an existing ``path``; changed?"""
    target = plan.at(path)
    info = target.stat()
    right = (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (mode, uid, gid)
    detail = f"{'kept' if right else 'set to'} {_perm(plan, mode, uid, gid)}"
    if plan.step("permissions" if target.is_file() else "directory", path, not right, detail):
        _set_owner(target, mode, uid, gid)
    return not right


def ensure_node_key(plan: Plan) -> str | None:
    """The node's Ed25519 key (root's, 0600; the unit hands it over as a credential); its DID."""
    target = plan.at(NODE_KEY_PATH)
    if target.exists():
        ensure_owner(plan, NODE_KEY_PATH, KEY_FILE_MODE, 0, 0)
        return load_key(target).did
    if plan.step("key", NODE_KEY_PATH, True, "generated, Ed25519, 0600 root:root"):
        signer = new_ed25519()
        save_key(signer, target)
        os.chown(target, 0, 0)
        return signer.did
    return None


def render_unit(hearth: Path) -> str:
    """The unit template with ExecStart= running ``hearth``."""
    try:
        text = UNIT_TEMPLATE.read_text()
    except FileNotFoundError:
        raise ServiceInstallError(
            "unit_template_missing",
            f"install-service runs from a source checkout of Hearth; {UNIT_TEMPLATE} is not there",
            details={"path": str(UNIT_TEMPLATE)},
        ) from None
    rendered, count = _EXEC_START.subn(lambda _: f"ExecStart={hearth}", text)
    if count != 1:
        raise ServiceInstallError("unit_template_invalid", f"{UNIT_TEMPLATE} must have one ExecStart= line")
    return rendered


def finish(plan: Plan, hearth: Path, did: str | None, unit_changed: bool) -> dict[str, Any]:
    """Reload systemd where it runs and the unit changed; the report, with what is left to run."""
    systemd_running = plan.root == Path("/") and SYSTEMD_RUNNING_MARKER.is_dir()
    reloaded = False
    if systemd_running and unit_changed and not plan.dry_run:
        _run("systemctl", "daemon-reload")
        reloaded = True
    commands = [] if reloaded or not unit_changed else ["systemctl daemon-reload"]
    commands.append("systemctl enable --now hearth")
    return {
        "root": str(plan.root),
        "dry_run": plan.dry_run,
        "changed": any(step.changed for step in plan.steps),
        "did": did,
        "exec_start": str(hearth),
        "unit": str(plan.at(UNIT_PATH)),
        "systemd_running": systemd_running,
        "daemon_reloaded": reloaded,
        "next": commands,
        "warnings": plan.warnings,
        "steps": [asdict(step) for step in plan.steps],
    }


def _print(report: dict[str, Any]) -> None:
    verb = "would change" if report["dry_run"] else "changed"
    for step in report["steps"]:
        print(
            f"  {verb if step['changed'] else 'ok':12} {step['what']:11} {step['path']}  ({step['detail']})"
        )
    if report["did"]:
        print(f"node DID {report['did']}")
    where = "" if report["systemd_running"] else " (systemd is not running here; run these where it is)"
    print(f"next{where}:")
    for command in report["next"]:
        print(f"  {command}")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


# -- helpers ------------------------------------------------------------------------------------------


def _table(plan: Plan, name: str) -> dict[str, list[str]]:
    """``/etc/passwd`` or ``/etc/group`` under the root: name -> the other fields (not the host's NSS)."""
    path = plan.at(Path("/etc") / name)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ServiceInstallError(
            "no_user_database", f"{path} does not exist", details={"path": str(path)}
        ) from None
    return {fields[0]: fields[1:] for fields in (line.split(":") for line in lines) if len(fields) >= 4}


def _ids(plan: Plan, user: str) -> tuple[int, int]:
    """uid and gid of ``user`` under the root; (-1, -1) while a dry run has not created it."""
    entry = _table(plan, "passwd").get(user)
    if entry is None:
        return -1, -1
    return int(entry[1]), int(entry[2])


def _perm(plan: Plan, mode: int, uid: int, gid: int) -> str:
    users = {int(f[1]): n for n, f in _table(plan, "passwd").items()}
    groups = {int(f[1]): n for n, f in _table(plan, "group").items()}
    owner = users.get(uid, SERVICE_USER if uid == -1 else str(uid))
    group = groups.get(gid, SERVICE_USER if gid == -1 else str(gid))
    return f"{mode:04o} {owner}:{group}"


def _set_owner(path: Path, mode: int, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _run(*argv: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ServiceInstallError("command_missing", f"{argv[0]} is not installed") from None
    except subprocess.CalledProcessError as exc:
        raise ServiceInstallError(
            f"{Path(argv[0]).name}_failed",
            f"{' '.join(argv)} failed ({exc.returncode}): {exc.stderr.strip()}",
            details={"argv": list(argv), "returncode": exc.returncode},
        ) from None
