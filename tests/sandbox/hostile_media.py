"""Hostile inputs for a node's media path, made at test time with host ffmpeg and a little byte work.

Nothing binary is committed. The centrepiece is :func:`h264_bomb`, a real decompression bomb: an 8K H.264
stream of one intra frame and thousands of all-skip P frames, about 130 KB on disk that decodes to about
100 GB of pixels. Encoding thousands of 8K frames would take minutes, so only two are encoded; the second
(a P frame of ~10 bytes that says "nothing changed") is repeated with its ``frame_num`` rewritten, which is
what an encoder would have written for the same still picture.
"""

from __future__ import annotations

import math
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tests.sandbox.media import ffmpeg

_START_CODE = re.compile(b"\x00\x00\x01")
_NAL_SPS, _NAL_PPS, _NAL_IDR, _NAL_SLICE = 7, 8, 5, 1


@dataclass(frozen=True, slots=True)
class Bomb:
    """A generated bomb: the file, its size on disk, and how many bytes of pixels it decodes to."""

    path: Path
    frames: int
    width: int
    height: int

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def decoded_bytes(self) -> int:
        return self.frames * self.width * self.height * 3 // 2  # yuv420p


def h264_bomb(
    path: Path, *, width: int = 8192, height: int = 4320, frames: int = 2000, fps: int = 1000
) -> Bomb:
    """A Matroska file with ``frames`` 8K H.264 frames: one black IDR frame, then empty P frames.

    At ``fps`` frames a second the whole thing lasts ``frames / fps`` seconds, so a duration cap cannot
    see it; only the pixel rate gives it away, and only the sandbox's limits stop it.
    """
    raw = path.with_suffix(".two.h264")
    ffmpeg(
        "-f", "lavfi", "-i", f"color=black:size={width}x{height}:rate={fps},format=yuv420p",
        "-frames:v", "2", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "51",
        # One reference, no B frames: x264 then writes picture order type 2 (order = decoding order),
        # so a P frame's only per-picture field is frame_num.
        "-x264-params", "keyint=infinite:bframes=0:ref=1", "-f", "h264", str(raw),
    )  # fmt: skip
    nals = _split_annex_b(raw.read_bytes())
    raw.unlink()
    sps = next(n for n in nals if n[0] & 0x1F == _NAL_SPS)
    pps = next(n for n in nals if n[0] & 0x1F == _NAL_PPS)
    idr = next(n for n in nals if n[0] & 0x1F == _NAL_IDR)
    p_frame = next(n for n in nals if n[0] & 0x1F == _NAL_SLICE)
    frame_num_bits = _frame_num_bits(sps)
    stream = bytearray()
    for nal in (sps, pps, idr):
        stream += b"\x00\x00\x00\x01" + nal
    for i in range(1, frames):
        stream += b"\x00\x00\x00\x01" + _with_frame_num(p_frame, i % (1 << frame_num_bits), frame_num_bits)
    raw.write_bytes(bytes(stream))
    ffmpeg("-f", "h264", "-r", str(fps), "-i", str(raw), "-c", "copy", "-f", "matroska", str(path))
    raw.unlink()
    return Bomb(path=path, frames=frames, width=width, height=height)


def deep_png(path: Path, *, width: int = 8192, height: int = 4320) -> Path:
    """One 16-bit RGBA PNG frame in Matroska: ~400 KB whose single frame is 280 MB once decoded.

    Within every dimension cap, yet probing it needs more memory than a probe is given.
    """
    ffmpeg(
        "-f", "lavfi", "-i", f"color=black:size={width}x{height}:rate=1", "-frames:v", "1",
        "-c:v", "png", "-pix_fmt", "rgba64be", "-compression_level", "9", "-f", "matroska", str(path),
    )  # fmt: skip
    return path


def noise_clip(path: Path, *, seconds: float, width: int = 320, height: int = 180) -> Path:
    """A small, silent H.264 clip of pure noise: cheap to store, expensive (and large) to encode well."""
    source = f"testsrc2=size={width}x{height}:rate=30:duration={seconds},noise=alls=80:allf=t"
    ffmpeg(
        "-f", "lavfi", "-i", source,
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "45", "-pix_fmt", "yuv420p", str(path),
    )  # fmt: skip
    return path


def plain_clip(path: Path, *, seconds: float, width: int, height: int) -> Path:
    """A silent H.264 test pattern clip (small on disk at any size)."""
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=30:duration={seconds}",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "45", "-pix_fmt", "yuv420p", str(path),
    )  # fmt: skip
    return path


def wav_claiming(path: Path, *, seconds: float, real_seconds: float = 0.1, rate: int = 8000) -> Path:
    """A 16-bit mono WAV whose header claims ``seconds`` of audio but which holds ``real_seconds``."""
    real = int(real_seconds * rate) * 2
    claimed = min(int(seconds * rate) * 2, 0xFFFFFFF0)
    header = b"RIFF" + struct.pack("<I", min(claimed + 36, 0xFFFFFFFF)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    data = b"data" + struct.pack("<I", claimed) + bytes(real)
    path.write_bytes(header + fmt + data)
    return path


def mkv_claiming(src: Path, dst: Path, *, seconds: float) -> Path:
    """``src`` remuxed to Matroska, then its segment Duration overwritten to claim ``seconds``.

    ``seconds`` may be anything a double holds (1e300, infinity, NaN): the header is the attacker's.
    """
    ffmpeg("-i", str(src), "-c", "copy", "-f", "matroska", str(dst))
    data = bytearray(dst.read_bytes())
    at = data.index(b"\x44\x89\x88")  # Duration element, 8-byte float, in TimecodeScale units (ms)
    struct.pack_into(">d", data, at + 3, seconds * 1000.0 if math.isfinite(seconds) else seconds)
    dst.write_bytes(bytes(data))
    return dst


def fuzzed(src: Path, dst: Path, *, seed: int, flips: int = 64, skip: int = 0) -> Path:
    """``src`` with ``flips`` seeded random bytes overwritten (after the first ``skip`` bytes)."""
    data = bytearray(src.read_bytes())
    rng = random.Random(seed)
    for _ in range(flips):
        data[rng.randrange(skip, len(data))] = rng.randrange(256)
    dst.write_bytes(bytes(data))
    return dst


# Text inputs that name other files or the network: each must be refused by the demuxer allow list.
PLAYLIST_TRICKS: dict[str, bytes] = {
    "hls": b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
    "ffconcat": b"ffconcat version 1.0\nfile '/etc/passwd'\nfile 'http://127.0.0.1:9/x.mp4'\n",
    "sdp": (
        b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        b"m=video 5004 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
    ),
    "dash": (
        b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        b'mediaPresentationDuration="PT10S"><Period><AdaptationSet><Representation id="1" '
        b'bandwidth="1"><BaseURL>file:///etc/passwd</BaseURL></Representation></AdaptationSet>'
        b"</Period></MPD>\n"
    ),
}


def _split_annex_b(data: bytes) -> list[bytes]:
    starts = [m.end() for m in _START_CODE.finditer(data)]
    nals = []
    for i, start in enumerate(starts):
        end = starts[i + 1] - 3 if i + 1 < len(starts) else len(data)
        nals.append(data[start:end].rstrip(b"\x00") if i + 1 < len(starts) else data[start:end])
    return nals


class _Bits:
    """Reads an RBSP (emulation prevention removed) bit by bit: fixed-width and Exp-Golomb numbers."""

    def __init__(self, nal: bytes) -> None:
        self.data = nal[1:].replace(b"\x00\x00\x03", b"\x00\x00")
        self.pos = 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | ((self.data[self.pos // 8] >> (7 - self.pos % 8)) & 1)
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.u(zeros)


def _frame_num_bits(sps: bytes) -> int:
    bits = _Bits(sps)
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    if profile not in (66, 77, 88):
        raise ValueError(f"unexpected H.264 profile {profile}: the bomb expects x264's baseline output")
    log2_max_frame_num = bits.ue() + 4
    if bits.ue() != 2:
        raise ValueError("the bomb expects picture order count type 2 (no B frames)")
    return log2_max_frame_num


def _with_frame_num(nal: bytes, frame_num: int, width: int) -> bytes:
    """A copy of the P slice ``nal`` with ``frame_num`` (the field after three Exp-Golomb ones) rewritten."""
    if b"\x00\x00\x03" in nal:
        raise ValueError("the P slice carries emulation prevention bytes; patching would misplace bits")
    bits = _Bits(nal)
    bits.ue(), bits.ue(), bits.ue()  # first_mb_in_slice, slice_type, pic_parameter_set_id
    out = bytearray(nal)
    for i in range(width):
        bit = (frame_num >> (width - 1 - i)) & 1
        pos = 8 + bits.pos + i  # + the NAL header byte
        out[pos // 8] = (out[pos // 8] & ~(0x80 >> (pos % 8))) | (bit << (7 - pos % 8))
    if re.search(b"\x00\x00[\x00-\x03]", out):
        raise ValueError("patching frame_num made a start-code prefix")
    return bytes(out)
