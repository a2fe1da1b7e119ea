"""What the two-host stage tests (test_disaggregated.py, test_glm_image_disaggregated.py) share."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import requests


def killed_mid_request(ar, dit, body: dict) -> requests.Response:
    """POST `body` to the DiT server's /v1/images/generations while its AR server is stopped (it takes
    the request and answers nothing), kill the AR server's process group 2 s in (its engine with it),
    and return the DiT server's answer; asserts it came (no hang)."""
    os.kill(ar.proc.pid, signal.SIGSTOP)
    got: dict = {}

    def ask():
        got["r"] = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=120, json=body)

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(2)
    os.killpg(ar.proc.pid, signal.SIGKILL)
    asking.join(60)
    assert not asking.is_alive(), "the DiT server hung on a dead AR server"
    return got["r"]


@contextlib.contextmanager
def ar_and_dit(family: str, model, workdir, flags: list[str], prefix: str):
    """The AR server (`--omni-stage ar`) in a network namespace joined to this machine's by a veth
    pair (kv/netns.py), the DiT server (`--omni-stage dit --omni-ar-url`) here, both with `flags`:
    yields (the AR server, the DiT server, the namespace's host); both stopped at the end."""
    from vllm_omni_plugin.kv import netns

    from .conftest import start_server

    with netns.veth_host(prefix) as (there, here):
        ar = start_server(family, model, workdir, [*flags, "--omni-stage", "ar"], host=there, env=there.env())
        try:
            dit = start_server(family, model, workdir, [*flags, "--omni-stage", "dit", "--omni-ar-url", ar.url],
                               env=here.env())
            try:
                yield ar, dit, there
            finally:
                dit.stop()
        finally:
            if ar.proc.poll() is None:
                os.killpg(ar.proc.pid, signal.SIGINT)
                ar.stop()
