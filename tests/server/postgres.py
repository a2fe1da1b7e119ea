"""A real PostgreSQL server for the job-store tests: Debian's `postgresql` package (.ci/run
installs it), a fresh cluster in a temporary directory, on a free loopback port.

PostgreSQL refuses to run as root; as root the cluster belongs to the package's `postgres`
user. Tests that need it are skipped, with the reason, where the binaries are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_omni_plugin.server.spawn import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    url: str
    data: Path
    bin: Path
    user: str | None

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


def start_postgres(workdir: Path) -> Postgres:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; returns its `postgresql://` URL."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without the `postgres` user that Debian's package creates")
        user = "postgres"
    root = workdir / "pg"
    root.mkdir()
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if user:
        shutil.chown(root, user)
        shutil.chown(sock, user)
    port = free_port()
    pg = Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", data, bin_dir, user)
    pg._run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg._run(str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
            "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off", "start")
    deadline = time.monotonic() + 30
    while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"postgres did not start:\n{(root / 'log').read_text()[-3000:]}")
        time.sleep(0.2)
    return pg


@pytest.fixture(scope="module")
def postgres():
    """A running PostgreSQL server (one per test module), stopped and removed afterwards."""
    # not under pytest's tmp dirs: those are 0700, and the `postgres` user must walk into it
    workdir = Path(tempfile.mkdtemp(prefix="omni-pg-"))
    os.chmod(workdir, 0o755)
    try:
        pg = start_postgres(workdir)
        yield pg
        pg.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
