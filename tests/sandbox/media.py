"""Hostile and odd media for the FFmpeg workload tests, crafted at test time (nothing binary is committed)."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

TOOL_TIMEOUT_SECONDS = 60


def ffmpeg(*args: str) -> None:
    """Run host ffmpeg quietly (argv, no shell), failing the test on a non-zero exit."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *args],
        check=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )


def random_bytes(path: Path, size: int = 64 * 1024, *, seed: int = 1234) -> Path:
    """Seeded noise: the same bytes every run, so a lucky format match cannot make the test flaky."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def rawvideo_avi(path: Path, *, width: int, height: int) -> Path:
    """A real AVI of tiny grey rawvideo frames whose headers claim ``width`` x ``height``.

    Rawvideo has no bitstream header of its own, so the container's claim is what ffprobe reports
    (an H.264 stream would be corrected by its SPS, hiding the lie).
    """
    small = path.with_suffix(".small.avi")
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=size=16x16:rate=5:duration=0.4",
        "-c:v",
        "rawvideo",
        "-pix_fmt",
        "gray",
        str(small),
    )
    data = bytearray(small.read_bytes())
    small.unlink()
    avih = data.index(b"avih") + 8  # MainAVIHeader: dwWidth, dwHeight are its 9th and 10th dwords
    struct.pack_into("<II", data, avih + 32, width, height)
    strf = data.index(b"strf") + 8  # BITMAPINFOHEADER: biSize, biWidth, biHeight
    struct.pack_into("<ii", data, strf + 4, width, height)
    path.write_bytes(bytes(data))
    return path


def remux(src: Path, dst: Path, *extra: str) -> Path:
    """Copy ``src``'s streams into ``dst`` with extra muxer options (faststart, rotation tags...)."""
    ffmpeg("-i", str(src), "-c", "copy", *extra, str(dst))
    return dst


def truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of ``src``'s bytes, as a download cut short would leave it."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst
