"""The AR stage on other hosts: what `vllm serve MODEL --omni --omni-stage dit --omni-ar-url ...` drives.

`RemoteAR` stands where the colocated server has vLLM's engine client: the family's
hand-over (`StageOrchestrator.hand_over`, unchanged) calls `generate(prompt, params, id)`
with the same prompt and sampling params, and reads the same `kv_transfer_params`
report. Here that call is

    POST {AR}/v1/completions   the prompt's token ids, max_tokens 1, kv_transfer_params
                               asking for the KV (vLLM's own route on the AR server);
                               a prompt with image inputs (img2img): POST {AR}/v1/omni/prefill,
                               the same prompt dict for the AR server's engine client (ar_wire.py)
    <- kv_transfer_params      {"omni_kv": {"status": "published", "nixl": handle}}
    NixlConsumer.pull(handle)  one NIXL READ (kv/nixl.py), off the event loop; its
                               notification frees the producer's buffer (else its lease)

and the report handed back says "pulled", holding the TransferredKV the colocated path
reads from its store. With several AR servers each request goes to the least loaded one
(vLLM's GET /load) that answers. Each AR server is checked once, on its first request,
to serve the same checkpoint (GET /omni/stage: the AR stage's fingerprint). Every
failure (unreachable, died mid-request, lease expired, NIXL READ failed, model mismatch)
is `StageUnavailable` (503) naming the AR server's URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .ar_wire import PREFILL_ROUTE, encode_prompt
from .engine_loop import StageUnavailable

logger = logging.getLogger("vllm.omni_plugin.orchestrator")

#: the AR server's route telling what it serves (server/plugin.py, `--omni-stage ar`)
STAGE_ROUTE = "/omni/stage"


def checkpoint_fingerprint(directory: str | Path) -> str:
    """What identifies the AR stage's checkpoint across hosts: its files' names, sizes and first 64 KiB
    (config, tokenizer, safetensors headers), hashed; paths and modification times do not count."""
    digest = hashlib.sha256()
    root = Path(directory)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read(65536))
    return digest.hexdigest()[:16]


class RemoteAR:
    """The AR servers of `--omni-ar-url`, shaped like the engine client a StageOrchestrator drives."""

    errored = False  # per-request failures are 503s; the DiT server itself stays up

    def __init__(self, urls: list[str], model: str, ar_model_dir: str, timeout_s: float = 300.0,
                 api_key: str | None = None) -> None:
        if not urls:
            raise ValueError("no AR server URL given")
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.fingerprint = checkpoint_fingerprint(ar_model_dir)
        #: the AR model's dtype as an AR server reports it (GET /omni/stage); None until one answered
        self.dtype: str | None = None
        self.timeout_s = timeout_s
        self._served: dict[str, str] = {}  # AR URL -> the model name its /v1/completions takes (checked)
        self._client: Any = None
        #: sent to the AR servers (the DiT server's own first --api-key: one key for both stages)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @property
    def client(self) -> Any:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=5.0), headers=self._headers)
        return self._client

    async def _load(self, url: str) -> float | None:
        try:
            reply = await self.client.get(f"{url}/load", timeout=5.0)
            return float(reply.json()["server_load"]) if reply.status_code == 200 else None
        except Exception:  # noqa: BLE001 - an AR server that does not answer is not picked
            return None

    async def pick(self) -> str:
        """The least loaded AR server that answers /load (the only one, unasked, when one is given)."""
        if len(self.urls) == 1:
            return self.urls[0]
        loads = await asyncio.gather(*(self._load(u) for u in self.urls))
        up = [(load, i) for i, load in enumerate(loads) if load is not None]
        if not up:
            raise StageUnavailable(f"no AR server answers: {', '.join(self.urls)} (GET /load failed on each)")
        return self.urls[min(up)[1]]

    async def _check(self, url: str) -> str:
        """The model name `url` serves, once it is known to run this checkpoint's AR stage."""
        if url in self._served:
            return self._served[url]
        reply = await self.client.get(f"{url}{STAGE_ROUTE}", timeout=10.0)
        if reply.status_code != 200:
            raise StageUnavailable(f"the AR server {url} is no `--omni-stage ar` server (GET {STAGE_ROUTE}: "
                                   f"HTTP {reply.status_code}); start it with `vllm serve MODEL --omni --omni-stage ar`")
        info = reply.json()
        if info.get("fingerprint") != self.fingerprint:
            raise StageUnavailable(
                f"model mismatch: the AR server {url} serves {info.get('model')} (checkpoint fingerprint "
                f"{info.get('fingerprint')}), this DiT server {self.model} (fingerprint {self.fingerprint}); "
                "start both with the same checkpoint")
        self._served[url] = info["served_model_name"]
        if info.get("dtype"):
            self.dtype = info["dtype"]
        return self._served[url]

    async def check_at_start(self) -> None:
        """Check every AR server once at start-up, logging what is wrong (a mismatch is also refused
        on each request to that server; one not up yet is checked on its first request)."""
        for url in self.urls:
            try:
                await self._check(url)
                logger.info("omni: AR server %s serves this checkpoint's AR stage", url)
            except StageUnavailable as e:
                logger.error("omni: %s", e)
            except Exception as e:  # noqa: BLE001 - not up yet: its first request checks it
                logger.warning("omni: AR server %s not reachable at start-up (%s); checked on its first request",
                               url, type(e).__name__)

    async def generate(self, prompt: Any, params: Any, request_id: str):
        """The AR prefill of one hand-over on an AR server; yields one output with the pulled KV.

        Token ids go to vLLM's /v1/completions; a prompt with image inputs to the AR server's
        PREFILL_ROUTE (ar_wire.py), which gives its engine client the same prompt dict.

        Raises:
            ValueError: the AR server refused the prompt itself (HTTP 400 from PREFILL_ROUTE).
            StageUnavailable: any other failure, naming the AR server.
        """
        import httpx

        sampling = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                    "kv_transfer_params": (params.extra_args or {}).get("kv_transfer_params")}
        if set(prompt) == {"prompt_token_ids"}:
            route, body = "/v1/completions", {"prompt": list(prompt["prompt_token_ids"]), **sampling}
        else:
            route, body = PREFILL_ROUTE, {**await asyncio.to_thread(encode_prompt, prompt), "sampling": sampling}
        body["request_id"] = request_id
        url = await self.pick()
        try:
            body["model"] = await self._check(url)
            reply = await self.client.post(f"{url}{route}", json=body)
        except httpx.HTTPError as e:
            raise StageUnavailable(f"the AR server {url} did not answer request {request_id}: "
                                   f"{type(e).__name__}: {e}") from e
        if reply.status_code == 400 and route == PREFILL_ROUTE:
            raise ValueError(f"the AR server {url} refused request {request_id}: {_message(reply)}")
        if reply.status_code != 200:
            raise StageUnavailable(f"the AR server {url} refused request {request_id} "
                                   f"(HTTP {reply.status_code}): {_message(reply)}")
        report = ((reply.json().get("kv_transfer_params") or {}).get("omni_kv")) or {}
        if report.get("status") != "published":
            raise StageUnavailable(f"the AR server {url} published no KV for request {request_id}: {report}")
        yield SimpleNamespace(kv_transfer_params={"omni_kv": await self._pull(url, report)})

    async def _pull(self, url: str, report: dict[str, Any]) -> dict[str, Any]:
        from ..kv.nixl import NixlTransferError, pull_transferred

        started = time.perf_counter()
        try:
            item = await asyncio.to_thread(pull_transferred, report)
        except NixlTransferError as e:
            raise StageUnavailable(f"the KV hand-over from the AR server {url} failed: {e}") from e
        # the hand-over the orchestrator's timings count: the producer's gather + this pull
        item.metadata["save_seconds"] = item.metadata.get("save_seconds", 0.0) + time.perf_counter() - started
        return {"status": "pulled", "transferred": item}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _message(reply: Any) -> str:
    """An error reply's message (OpenAI format where it is one), else its text."""
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:500]
