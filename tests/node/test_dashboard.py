"""The dashboard (GET /ui) served by the daemon: its security headers, and in a real browser with a live job.

The browser test runs ``hearth run`` as a process, starts a transcode long enough to be caught running,
and loads /ui in headless Chromium twice: ``--screenshot`` (the PNG is decoded here, with zlib and
numpy, no imaging library) and ``--dump-dom``. The page draws a running job's progress in a colour used
nowhere else (#00b386) over a track of its own width; the screenshot must show that fill, as one solid
bar inside its track, as long as the job's progress says. Chromium is required: a missing browser fails
the test rather than skipping it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
import subprocess
import time
import urllib.request
import zlib
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

from node.overview import UI_FILES
from payments.keys import Signer
from requester.client import sign_request
from sandbox.ffmpeg import make_test_clip
from tests.conftest import DaemonProcess, LiveNode, free_port, write_home
from tests.node.test_execution import RUN_CONFIG, containers_of, submit, transcode, upload, wait_state

UI = Path(__file__).resolve().parents[2] / "node" / "ui"
FILL = (0x00, 0xB3, 0x86)  # app.css --progress: a running job's progress, and nothing else
TRACK = (0x2A, 0x39, 0x47)  # app.css --track: the bar behind it
WINDOW = (1280, 900)
BROWSER_TIMEOUT_SECONDS = 60


# -- served files -------------------------------------------------------------------------------------


async def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False) as r:
        return r.status, dict(r.headers), await r.read()


async def test_the_dashboard_is_served_under_a_strict_content_security_policy(live_node: LiveNode) -> None:
    for path, media_type in (("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript")):
        status, headers, body = await fetch(live_node.url + path)
        assert status == 200, body
        assert headers["Content-Type"].startswith(media_type)
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "*" not in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = await fetch(live_node.url + "/ui/app.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    assert body == (UI / "app.css").read_bytes()
    for missing in ("/ui/nothing.js", "/ui/..", "/ui/node.key"):
        status, headers, body = await fetch(live_node.url + missing)
        assert status == 404, (missing, body)
        assert json.loads(body)["error"]["code"] in ("ui_asset_not_found", "not_found")


def test_the_page_needs_nothing_the_policy_forbids() -> None:
    html = (UI / "index.html").read_text()
    # every file it loads is one of ours, from this node; no inline script or style (the policy blocks them)
    assert sorted(re.findall(r'(?:src|href)="([^"]*)"', html)) == ["/ui/app.css", "/ui/app.js"]
    assert set(UI_FILES) == {p.name for p in UI.iterdir()}
    assert "<style" not in html and " style=" not in html and "<script>" not in html
    script = (UI / "app.js").read_text()
    # nothing fetched from elsewhere (the SVG namespace is a name, not a fetch); requester text never as HTML
    assert set(re.findall(r"https?://[^\s\"'`]+", script)) == {"http://www.w3.org/2000/svg"}
    assert "innerHTML" not in script and "eval(" not in script and 'setAttribute("style' not in script


# -- in a browser -------------------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail("chromium is not installed; scripts/setup.sh installs it (Debian package `chromium`)")


def browse(browser: str, url: str, profile: Path, *mode: str) -> bytes:
    """Load ``url`` headless for three seconds of page time (two polls); return stdout."""
    proc = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--force-color-profile=srgb",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--virtual-time-budget=3000",
            *mode,
            url,
        ],
        capture_output=True,
        timeout=BROWSER_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout


def decode_png(data: bytes) -> npt.NDArray[np.uint8]:
    """The pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes): (height, width, 3)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
    assert header is not None, "no IHDR"
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unexpected PNG format {header}"
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(chunks))
    assert len(raw) == height * (stride + 1)
    pixels = np.zeros((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1)
        if kind == 0:  # None
            current = line.copy()
        elif kind == 1:  # Sub: a running sum along each channel, modulo 256
            current = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif kind == 2:  # Up
            current = line + prior
        elif kind in (3, 4):  # Average, Paeth: each byte needs the one reconstructed before it
            current = np.frombuffer(
                _unfilter_sequential(kind, line.tobytes(), prior.tobytes(), bpp), np.uint8
            )
        else:
            raise AssertionError(f"row {y}: unknown PNG filter {kind}")
        pixels[y] = current
        prior = current
    return pixels.reshape(height, width, bpp)[:, :, :3]


def _unfilter_sequential(kind: int, line: bytes, prior: bytes, bpp: int) -> bytes:
    out = bytearray(len(line))
    for i, value in enumerate(line):
        a = out[i - bpp] if i >= bpp else 0
        b = prior[i]
        if kind == 3:
            predicted = (a + b) >> 1
        else:
            c = prior[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predicted = a if pa <= pb and pa <= pc else b if pb <= pc else c
        out[i] = (value + predicted) & 0xFF
    return bytes(out)


def progress_bar(pixels: npt.NDArray[np.uint8]) -> tuple[float, int, int]:
    """Find the running job's bar: ``(filled fraction, track width px, bar height px)``.

    The fill colour must form exactly one solid rectangle (so nothing else is drawn in it), and the track
    colour must continue it to the right on the same rows, the same height.
    """
    fill = np.all(pixels == FILL, axis=2)
    ys, xs = np.nonzero(fill)
    assert ys.size, "no pixel of the progress colour: no running job's bar is drawn"
    top, bottom, left, right = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    assert fill[top : bottom + 1, left : right + 1].all(), "the progress colour is not one solid bar"
    assert int(fill.sum()) == (bottom - top + 1) * (right - left + 1)
    track = np.all(pixels == TRACK, axis=2)
    x = right + 1
    if not track[top, x]:  # one blended column where the fill ends mid-pixel
        x += 1
    end = x
    while end < pixels.shape[1] and track[(top + bottom) // 2, end]:
        end += 1
    assert track[top : bottom + 1, x:end].all(), "the track is not level with the fill"
    assert not track[top - 1, x:end].any() and not track[bottom + 1, x:end].any()
    return (right - left + 1) / (end - left), end - left, bottom - top + 1


class _JobText(HTMLParser):
    """The text inside the element whose ``data-job`` is the given job, and its progressbar's value."""

    def __init__(self, job: str) -> None:
        super().__init__()
        self.job = job
        self.depth = 0
        self.texts: list[str] = []
        self.value: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if self.depth or named.get("data-job") == self.job:
            self.depth += 1
            if named.get("role") == "progressbar":
                self.value = named.get("aria-valuenow")

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth and data.strip():
            self.texts.append(data.strip())


def running_percent(url: str, job: str) -> float:
    """The job's progress from GET /v1/overview; fails unless it is running, transcoding."""
    with urllib.request.urlopen(f"{url}/v1/overview?recent=0", timeout=10) as resp:
        doc = json.load(resp)
    running = {j["id"]: j for j in doc["jobs"]["running"]}
    assert job in running, f"job {job} is not running: {doc['jobs']['by_state']}"
    assert running[job]["stage"] == "transcoding", running[job]
    return float(running[job]["percent"] or 0.0)


def test_the_dashboard_shows_a_running_job_and_its_progress(
    tmp_path: Path, requester: Signer, sandbox_images: dict[str, str]
) -> None:
    browser = chromium()
    port = free_port()
    daemon = DaemonProcess(write_home(tmp_path / "home", RUN_CONFIG, port=port), port)
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=30, width=320, height=240)
    job: str | None = None

    async def begin() -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/v1/capacity") as r:
            node_did = str((await r.json())["node"])
        env = transcode(await upload(daemon.url, clip.read_bytes()), "dash-1", resolution="720p")
        env["limits"]["cpus"] = 0.5  # a slow run: it is still transcoding while the browser looks
        return await submit(daemon.url, node_did, requester, env)

    try:
        daemon.start()
        job = asyncio.run(begin())
        deadline = time.monotonic() + 60
        while True:  # transcoding, far enough along for a bar a few dozen pixels long
            try:
                before = running_percent(daemon.url, job)
            except AssertionError:
                before = -1.0
            if before >= 2.0:
                break
            assert time.monotonic() < deadline, "the transcode never got going"
            time.sleep(0.2)

        shot = tmp_path / "dashboard.png"
        browse(browser, f"{daemon.url}/ui", tmp_path / "profile-1", f"--screenshot={shot}")
        dom = browse(browser, f"{daemon.url}/ui", tmp_path / "profile-2", "--dump-dom").decode()
        after = running_percent(daemon.url, job)  # still running: both pages saw it running

        fraction, track_width, height = progress_bar(decode_png(shot.read_bytes()))
        assert track_width >= 0.8 * WINDOW[0] and 12 <= height <= 20, (track_width, height)
        tolerance = 2 / track_width  # a pixel either way, at each end
        assert before / 100 - tolerance <= fraction <= after / 100 + tolerance, (before, fraction, after)

        found = _JobText(job)
        found.feed(dom)
        assert job in found.texts and "transcoding" in found.texts, found.texts
        shown = [float(t[:-1]) for t in found.texts if re.fullmatch(r"\d+(\.\d+)?%", t)]
        # the page shows one decimal, rounded: at most half a tenth off (23.75 shows as 23.8), give or
        # take the float error of that half tenth
        half = 0.05 + 1e-9
        assert len(shown) == 1 and before - half <= shown[0] <= after + half, (before, shown, after)
        assert found.value is not None and float(found.value) == pytest.approx(shown[0], abs=half)
    finally:
        if job is not None and daemon.proc is not None and daemon.proc.poll() is None:
            cancel(daemon.url, requester, job)
        daemon.stop()


def cancel(url: str, requester: Signer, job: str) -> None:
    """Cancel the job and wait until its container is gone, so it does not slow later tests."""

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/capacity") as r:
                node_did = str((await r.json())["node"])
            token = sign_request(requester, node_did, {"cancel": job})
            headers = {"Content-Type": "application/jwt"}
            async with s.post(f"{url}/v1/jobs/{job}/cancel", data=token, headers=headers) as r:
                assert r.status == 200, await r.text()
        await wait_state(url, job, {"cancelled"}, limit=30)

    asyncio.run(go())
    deadline = time.monotonic() + 30
    while containers_of(job):
        assert time.monotonic() < deadline, "the container outlived its cancelled job"
        time.sleep(0.2)
