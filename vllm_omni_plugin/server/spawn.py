"""Run `vllm serve MODEL --omni` as a child process, for scripts, benchmarks and tests.

    with spawn_server(model, ["--dtype", "bfloat16"], log=Path("server.log")) as server:
        client = server.client()          # an openai.OpenAI pointed at it
        ...

The child is vLLM's own console script (`vllm serve ... --omni`, the command
users type) with its output in `log`; `spawn_server` returns once `/health`
answers 200 and stops the child (SIGINT, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class SpawnedServer:
    proc: subprocess.Popen
    port: int
    log: Path
    api_key: str | None
    startup_seconds: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs):
        """An `openai.OpenAI` client for this server (no retries, long timeout by default)."""
        import openai  # here, not at the top: starting a server (benchmarks, tests) needs no client


        kwargs.setdefault("api_key", self.api_key or "unused")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 3600)
        return openai.OpenAI(base_url=self.url + "/v1", **kwargs)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once `GET url/health` answers 200.

    Raises:
        RuntimeError: `proc` exited first, or `timeout` s passed; the message holds the log's tail.
    """
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(map(str, proc.args))}` exited with {proc.returncode}:\n"
                               f"{Path(log).read_text()[-4000:]}")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{url} did not become healthy in {timeout:.0f} s:\n{Path(log).read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)


@contextmanager
def spawn_server(model: str | Path, args: list[str] = (), *, log: Path, api_key: str | None = None,
                 timeout: float = 900, env: dict[str, str] | None = None) -> Iterator[SpawnedServer]:
    """Start `vllm serve model --omni *args` on 127.0.0.1 and yield it once healthy.

    Args:
        model: checkpoint path or model id.
        args: further `vllm serve` / omni flags.
        log: file that receives the server's stdout and stderr.
        api_key: passed as --api-key, and used by `client()`.
        timeout: seconds to wait for /health (a full-size GPU model compiles and captures graphs).
        env: environment of the child (default: this process's).
    Raises:
        RuntimeError: the server exited or did not become healthy; the message holds the log's tail.
    """
    port = free_port()
    vllm = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm), "serve", str(model), "--omni", "--host", "127.0.0.1", "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    log = Path(log)
    started = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(env or os.environ))
    server = SpawnedServer(proc, port, log, api_key, 0.0)
    try:
        wait_healthy(server.url, proc, log, timeout)
        server.startup_seconds = time.monotonic() - started
        yield server
    finally:
        server.stop()
