"""`make demo`'s program: the last line it prints is the PNG it wrote (logs go to files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.engine


def test_demo_ends_with_the_png_path(tmp_path):
    env = {**os.environ, "OMNI_DEMO_DIR": str(tmp_path), "OMNI_DEMO_SKIP_BAGEL": "1"}
    done = subprocess.run([sys.executable, "-m", "vllm_omni_plugin.demo"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    last = Path(lines[-1])
    assert last == tmp_path / "qwen-image-tiny.png" and Image.open(last).size == (128, 128)
    assert len(lines) < 10, lines  # the server's log went to its file
    assert (tmp_path / "server.log").stat().st_size > 0
