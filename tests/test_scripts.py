"""The set-up scripts' helpers, run as the scripts run them: the host's Debian mirror that
scripts/docker.sh debootstraps from (apt_mirror.py), and the venv held to requirements.lock (venv_lock.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from tests.conftest import REPO

SCRIPT_TIMEOUT_SECONDS = 60

ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main contrib
deb [arch=amd64 signed-by=/etc/apt/docker.gpg] https://download.docker.com/linux/debian bookworm stable
deb cdrom:[Debian GNU/Linux 12 Bookworm]/ bookworm main
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb [ arch=amd64 ]\thttp://ftp.de.debian.org/debian/  bookworm  main contrib  # the archive
deb http://deb.debian.org/debian bookworm-updates main
"""

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main

# The archive, from a nearby mirror first.
types: deb deb-src
uris: https://mirror.example.org/debian/
 http://deb.debian.org/debian
Suites: trixie trixie-updates
Components: main non-free-firmware
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mDMEY865UxYJKwYBBAHaRw8BAQdAd7Z0srwuhlB6JKFkcf4HU4SSS/xcRfwEQWzr
 -----END PGP PUBLIC KEY BLOCK-----
"""

UBUNTU = """\
deb http://archive.ubuntu.com/ubuntu noble main restricted universe
deb http://security.ubuntu.com/ubuntu noble-security main
"""


def apt_dir(tmp_path: Path, sources_list: str | None = None, **parts: str) -> Path:
    """An apt configuration folder: ``sources.list`` and ``sources.list.d/<name>`` (``_`` for ``.``)."""
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (root / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (root / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return root


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
        check=False,
    )


def mirror(root: Path) -> str | None:
    proc = run_script("apt_mirror.py", str(root))
    assert proc.stderr == ""
    if proc.returncode == 1:
        assert proc.stdout == ""
        return None
    assert proc.returncode == 0
    return proc.stdout.removesuffix("\n")


def test_one_line_sources_give_the_first_debian_archive(tmp_path: Path) -> None:
    # Not the source-only line, the security archive, the third-party or cdrom ones: the first archive.
    assert mirror(apt_dir(tmp_path, ONE_LINE)) == "http://ftp.de.debian.org/debian"


def test_deb822_sources_give_the_first_uri_of_the_first_debian_stanza(tmp_path: Path) -> None:
    assert mirror(apt_dir(tmp_path, debian_sources=DEB822)) == "https://mirror.example.org/debian"


def test_sources_are_read_in_apt_order(tmp_path: Path) -> None:
    root = apt_dir(
        tmp_path,
        UBUNTU,  # sources.list first: nothing of Debian's there
        **{
            "00-old_list_disabled": "deb http://ignored.example/debian bookworm main\n",
            "10-debian_sources": DEB822,
            "20-more_list": ONE_LINE,
        },
    )
    assert mirror(root) == "https://mirror.example.org/debian"
    (root / "sources.list").write_text(ONE_LINE)
    assert mirror(root) == "http://ftp.de.debian.org/debian"


def test_no_debian_archive_prints_nothing(tmp_path: Path) -> None:
    assert mirror(apt_dir(tmp_path)) is None
    assert mirror(apt_dir(tmp_path / "ubuntu", UBUNTU, security_list=ONE_LINE.splitlines()[2])) is None
    assert mirror(tmp_path / "no-such-dir") is None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_requirement_of_pyproject_at_an_allowed_version() -> None:
    lock = (REPO / "requirements.lock").read_text()
    pins = {canonical(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==([^ ;\\\n]+)", lock, re.M)}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    assert len(wanted) > 20
    for req in wanted:
        assert canonical(req.name) in pins, f"{req.name} is not in requirements.lock: run `make lock`"
        pinned = pins[canonical(req.name)]
        assert req.specifier.contains(pinned, prereleases=True), f"{req} but the lock pins {pinned}"
    assert "ffmpeg-python" not in pins  # it was declared and never imported
    assert {"import-linter", "uv"} <= pins.keys()  # `make lint` and `make lock` use them
    entries = [e for e in re.split(r"^(?=[A-Za-z0-9])", lock, flags=re.M) if "==" in e.split("\n")[0]]
    assert len(entries) == len(pins)
    assert all("--hash=sha256:" in entry for entry in entries)  # pip installs it in hash-checking mode


def test_check_names_each_requirement_the_venv_misses(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "demo"\ndependencies = ["pytest>=1", "pytest<1"]\n'
        '[project.optional-dependencies]\ndev = ["hearth-no-such-distribution>=1", "pluggy"]\n'
    )
    proc = run_script("venv_lock.py", "check", "--pyproject", str(pyproject))
    assert proc.returncode == 1
    problems = [line.split(f"{pyproject}: ", 1)[1] for line in proc.stderr.splitlines()[:-1]]
    pytest_version = metadata.version("pytest")
    assert problems == [
        f"pytest<1 (installed: {pytest_version})",
        "hearth-no-such-distribution>=1 (not installed)",
    ]
    assert "make lock" in proc.stderr.splitlines()[-1]

    pyproject.write_text('[project]\nname = "demo"\ndependencies = ["pytest>=1"]\n')
    proc = run_script("venv_lock.py", "check", "--pyproject", str(pyproject))
    assert (proc.returncode, proc.stderr) == (0, "")


def test_extras_are_the_installed_distributions_the_lock_leaves_out(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("pytest==9.2.0 \\\n    --hash=sha256:00\n    # via demo\nPluggy==1.7.0\n")
    proc = run_script("venv_lock.py", "extras", "--lock", str(lock))
    assert proc.returncode == 0, proc.stderr
    extras = proc.stdout.splitlines()
    assert "iniconfig" in extras  # installed (pytest needs it), not locked here
    assert not {"pytest", "pluggy", "pip", "setuptools", "hearth"} & set(extras)
    assert extras == sorted(extras)


def test_every_demo_script_parses_and_the_agents_client_starts() -> None:
    demos = sorted((REPO / "scripts").glob("demo*.sh"))
    assert {p.name for p in demos} >= {"demo.sh", "demo_market.sh", "demo_agent.sh", "demo_cluster.sh"}
    for script in demos:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, (script.name, done.stderr)
    client = REPO / "scripts" / "demo_agent_client.py"
    done = subprocess.run(
        [sys.executable, str(client), "--help"],
        capture_output=True, text=True, check=False, timeout=SCRIPT_TIMEOUT_SECONDS, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0 and "--validator-url" in done.stdout, done.stderr


def test_hearth_demo_takes_one_of_inference_market_agent_and_cluster() -> None:
    for pair in (["--agent", "--market"], ["--cluster", "--market"], ["--cluster", "--inference"]):
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "demo", *pair],
            capture_output=True, text=True, check=False, timeout=SCRIPT_TIMEOUT_SECONDS, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 2 and "not allowed with argument" in done.stderr, (pair, done.stderr)
