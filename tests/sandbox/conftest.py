"""Sandbox fixtures: a running Docker engine with Hearth's images, and a runner bound to a test node.

``sandbox_images`` (tests/conftest.py) runs ``scripts/docker.sh`` once per session: seconds when the engine
runs and the images are built, minutes on a fresh machine (which it sets up: engine, base image, images).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.runner import LABEL_NODE, SandboxRunner

REPO = Path(__file__).resolve().parents[2]
FFMPEG_TAG = "hearth/ffmpeg:latest"


@pytest.fixture(scope="session")
def ffmpeg_image_id(sandbox_images: dict[str, str]) -> str:
    """The image ID (sha256:...) of hearth/ffmpeg:latest."""
    return sandbox_images[FFMPEG_TAG]


@pytest.fixture(scope="session")
def sandbox_runner(docker_client: Any) -> Iterator[SandboxRunner]:
    """A runner for a node name unique to this session; whatever it leaves behind is removed at the end."""
    node = f"did:test:{uuid.uuid4().hex[:12]}"
    runner = SandboxRunner(node=node, output_poll_seconds=0.05)
    try:
        yield runner
    finally:
        runner.close()
        for container in docker_client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node}"}):
            container.remove(force=True)
