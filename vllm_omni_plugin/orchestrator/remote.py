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
reads from its store. A hand-over that asks for no KV -- the AR's generated tokens are what
the DiT takes (GLM-Image's prior tokens, connector `inline`) -- is instead

    POST {AR}/inference/v1/generate   vLLM's own tokens-in/tokens-out route: the prompt's
                               token ids, its source images as PNG data URLs (content_parts),
                               the SamplingParams' set fields (seed included)
    <- choices[0].token_ids    handed back as `.outputs[0].token_ids`, as vLLM's RequestOutput

so the AR server builds the same engine request the colocated engine client gets. With several AR servers each request goes to the least loaded one
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

from .ar_wire import PREFILL_ROUTE, encode_prompt, png_base64
from .engine_loop import StageUnavailable

logger = logging.getLogger("vllm.omni_plugin.orchestrator")

#: the AR server's route telling what it serves (server/plugin.py, `--omni-stage ar`)
STAGE_ROUTE = "/omni/stage"


#: vLLM's tokens-in/tokens-out route (`--enable-scale-out`, which `--omni-stage ar` sets for an inline hand-over)
TOKENS_ROUTE = "/inference/v1/generate"


def sampling_fields(params: Any) -> dict[str, Any]:
    """vLLM SamplingParams as the JSON its /inference/v1/generate parses back: the public fields
    that differ from SamplingParams()'s, so the AR server builds the same object."""
    import msgspec
    from vllm import SamplingParams as VllmSamplingParams

    default = VllmSamplingParams()
    return {name: msgspec.to_builtins(getattr(params, name)) for name in params.__struct_fields__
            if not name.startswith("_") and name not in ("extra_args", "output_kind")
            and getattr(params, name) != getattr(default, name)}


def png_data_url(image: Any) -> str:
    """A PIL image as a `data:image/png;base64,` URL (lossless; ar_wire's one PNG encoding)."""
    return "data:image/png;base64," + png_base64(image)


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
        #: the AR servers' max_model_len as they report it (GET /omni/stage); None until one answered
        self.max_model_len: int | None = None
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
        if info.get("max_model_len"):  # the smallest of the AR servers checked: what every one holds
            self.max_model_len = min(self.max_model_len or info["max_model_len"], info["max_model_len"])
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

    async def _post(self, url: str, path: str, body: dict[str, Any], request_id: str, *,
                    input_errors: bool = False) -> dict[str, Any]:
        """POST `body` to the AR server `url` (checked first, its model name put in); its JSON answer.

        Raises:
            ValueError: with `input_errors`, a 400: the AR server refused the request's input itself
                (the caller answers 400 too).
            StageUnavailable: any other failure, naming the AR server.
        """
        import httpx

        try:
            body = {"model": await self._check(url), **body}
            reply = await self.client.post(f"{url}{path}", json=body)
        except httpx.HTTPError as e:
            raise StageUnavailable(f"the AR server {url} did not answer request {request_id}: "
                                   f"{type(e).__name__}: {e}") from e
        if reply.status_code == 400 and input_errors:
            raise ValueError(f"the AR server {url} refused request {request_id}: {_message(reply)}")
        if reply.status_code != 200:
            raise StageUnavailable(f"the AR server {url} refused request {request_id} "
                                   f"(HTTP {reply.status_code}): {_message(reply)}")
        return reply.json()

    async def generate(self, prompt: Any, params: Any, request_id: str):
        """One AR request of a hand-over on an AR server: yields one output, holding the pulled KV
        (a hand-over that asks for the KV) or the generated token ids (one that does not).

        KV hand-overs: token ids go to vLLM's /v1/completions; a prompt with image inputs to the AR
        server's PREFILL_ROUTE (ar_wire.py), which gives its engine client the same prompt dict.
        """
        if "kv_transfer_params" not in (params.extra_args or {}):  # the AR's generated tokens are the hand-over
            yield await self._generate_tokens(prompt, params, request_id)
            return
        sampling = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                    "kv_transfer_params": (params.extra_args or {}).get("kv_transfer_params")}
        if isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
            route, body = "/v1/completions", {"prompt": list(prompt["prompt_token_ids"]), **sampling}
        else:
            route, body = PREFILL_ROUTE, {**await asyncio.to_thread(encode_prompt, prompt), "sampling": sampling}
        body["request_id"] = request_id
        url = await self.pick()
        reply = await self._post(url, route, body, request_id, input_errors=route == PREFILL_ROUTE)
        report = ((reply.get("kv_transfer_params") or {}).get("omni_kv")) or {}
        if report.get("status") != "published":
            raise StageUnavailable(f"the AR server {url} published no KV for request {request_id}: {report}")
        yield SimpleNamespace(kv_transfer_params={"omni_kv": await self._pull(url, report)})

    async def _generate_tokens(self, prompt: Any, params: Any, request_id: str) -> Any:
        """The AR request on vLLM's tokens-in/tokens-out route (`/inference/v1/generate`): the same
        token ids, source images and SamplingParams the colocated engine client gets; an output
        shaped like vLLM's RequestOutput (`.outputs[0].token_ids`)."""
        if not isinstance(prompt, dict) or not set(prompt) <= {"prompt_token_ids", "multi_modal_data"} \
                or not set(prompt.get("multi_modal_data") or {}) <= {"image"}:
            raise StageUnavailable(f"this DiT server (--omni-stage dit) hands over token-id prompts with images, "
                                   f"not {sorted(prompt) if isinstance(prompt, dict) else type(prompt).__name__}")
        url = await self.pick()
        body: dict[str, Any] = {"request_id": request_id, "token_ids": list(prompt["prompt_token_ids"]),
                                "sampling_params": sampling_fields(params), "output_mode": "tokens"}
        images = (prompt.get("multi_modal_data") or {}).get("image") or []
        if images:  # each one a lossless PNG data URL, decoded to the same pixels by vLLM's media loader
            body["content_parts"] = [{"type": "image_url", "url": png_data_url(image)} for image in images]
        reply = await self._post(url, TOKENS_ROUTE, body, request_id)
        choice = reply["choices"][0]
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(choice["token_ids"]),
                                                        finish_reason=choice.get("finish_reason"))])

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
