"""A real `vllm serve <tiny checkpoint> --omni` on 127.0.0.1, shared by the tests.

At most one server runs at a time (2 CPU cores): `omni_server(family)`
returns the running server when it serves that family, otherwise stops it
and starts the one asked for. The test files run in an order that starts each
configuration as few times as possible (order.py; pytest_collection_modifyitems below).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from vllm_omni_plugin.server.spawn import free_port  # noqa: F401 -- also imported from here by test files

ROOT = Path(__file__).resolve().parents[2]
VLLM = Path(sys.executable).with_name("vllm")
OMNI_CLI = Path(sys.executable).with_name("vllm-omni")
API_KEY = "omni-test-key"
BODY_LIMIT = "body_limit.EightMegabyteBodyLimit"  # a deployment's own middleware (413s)
STARTUP_TIMEOUT_S = 420  # seconds a test server may take to answer /health
FETCH_TIMEOUT_S = 3  # VLLM_IMAGE_FETCH_TIMEOUT of the test servers: one deadline per image fetch

# Stage defaults every test server runs with: keeps omitted-parameter requests
# cheap on CPU and exercises precedence (request > these > the pipeline's own).
STAGE_DEFAULTS = {
    "qwen-image": '{"num_inference_steps": 2, "height": 64, "width": 64}',
    "qwen-image-edit": '{"num_inference_steps": 2}',
    "qwen-image-edit-plus": '{"num_inference_steps": 2}',
    "qwen-image-layered": '{"num_inference_steps": 2}',
    "wan2.2-i2v": '{"num_inference_steps": 2, "height": 32, "width": 48, "num_frames": 5}',
    "wan2.2-ti2v-5b": '{"num_inference_steps": 2, "height": 32, "width": 64, "num_frames": 5}',
    "wan2.2-t2v": '{"num_inference_steps": 2, "height": 64, "width": 64, "num_frames": 5}',
    "bagel": '{"num_inference_steps": 3}',
    "glm-image": '{"num_inference_steps": 3}',
    "flux": '{"num_inference_steps": 2, "height": 64, "width": 64}',
    "flux-kontext": '{"num_inference_steps": 2, "max_area": 4096}',
}

# The BAGEL server's stage config (--stage-configs-path): the shipped one with
# CPU-sized AR engine args. max_model_len here is 1024; the server is started
# with `--max-model-len 512`, which wins (vLLM serve flags > the stage config).
BAGEL_STAGE_CONFIG = """\
name: bagel-cpu-test
architectures: [BagelForConditionalGeneration]
stages:
  - id: ar
    type: llm
    engine_args:
      hf_overrides: {architectures: [OmniBagelForConditionalGeneration]}
      dtype: float32
      max_model_len: 1024
      enforce_eager: true
      seed: 0
      limit_mm_per_prompt: {image: 1, vae_image: 1}
      max_num_batched_tokens: 1024
      kv_transfer_config: {kv_connector: OmniKVConnector, kv_role: kv_producer}
    default_sampling_params: {temperature: 0.0, max_tokens: 8}
    connector: omni_kv
  - id: dit
    type: diffusion
    inputs_from: ar
    input_processor: bagel_context
    default_sampling_params: {num_inference_steps: 4}
    final_output: true
"""

# The GLM-Image server's stage config: the shipped one with CPU-sized AR engine args.
GLM_IMAGE_STAGE_CONFIG = """\
name: glm-image-cpu-test
architectures: [GlmImagePipeline]
stages:
  - id: ar
    type: llm
    subfolder: vision_language_encoder
    tokenizer_subfolder: processor
    engine_args: {dtype: float32, max_model_len: 1024, enforce_eager: true, seed: 0}
    max_batch_size: 4
    connector: inline
  - id: dit
    type: diffusion
    inputs_from: ar
    input_processor: glm_image_prior
    max_batch_size: 4
    final_output: true
"""


@dataclass
class Server:
    family: str
    model: Path
    port: int
    proc: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)
    address: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def client(self, **kw):
        import openai

        kw.setdefault("api_key", API_KEY)
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 300)
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}

    def metrics(self) -> dict[str, float]:
        text = requests.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        """Kill the server and every process under it (its engines, their workers). A graceful
        SIGINT shutdown costs each process its interpreter teardown (~5 s of CPU per server, 10-15 s
        on a loaded box) and no test looks at it: the tests of a server's or an engine's end make
        it happen themselves (test_bagel_stage_kill.py, test_engine_process.py, test_omni_lifecycle.py)."""
        import psutil

        if self.proc.poll() is not None:
            return
        try:  # the whole tree first: killed, the server's children would be re-parented out of reach
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:  # the server first: it starts no new engine after this
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)
        deadline = time.monotonic() + 30  # (not psutil.wait_procs: it waits for an orphan zombie to be reaped)
        while any(_running(p) for p in tree[1:]) and time.monotonic() < deadline:
            time.sleep(0.02)



def _running(p) -> bool:
    """`p` (a psutil.Process) runs: it exists and is not a zombie."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_server(family: str, model: Path | str, workdir: Path, extra_args: list[str], use_omni_cli: bool = False,
                 env: dict[str, str] | None = None, port: int | None = None, host=None) -> Server:
    """`host`: a `kv.netns.Host` to run the server in (listening on its address), else this machine."""
    port = port or free_port()
    log = workdir / f"server-{family}-{port}.log"
    args = [str(model), "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
            "--default-sampling-params", STAGE_DEFAULTS[family], *extra_args]
    cmd = [str(OMNI_CLI), "serve", *args] if use_omni_cli else [str(VLLM), "serve", *args, "--omni"]
    # PYTHONPATH: the server imports --middleware body_limit.EightMegabyteBodyLimit from this folder (not
    # the repository root, where a stale *.egg-info would shadow the installed entry points)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
           **(env or {})}
    with open(log, "w") as fh:
        if host is None or host.namespace is None:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        else:  # (the last --host wins)
            proc = host.popen([*cmd, "--host", host.address], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                              start_new_session=True)  # its own group: a test may kill it with its engine
    server = Server(family, model, port, proc, log, address="127.0.0.1" if host is None or host.namespace is None
                    else host.address)
    # A diffusion-only server starts two interpreters (the API server, then its engine process,
    # each importing torch + diffusers): on a loaded 2-core box that has taken more than 240 s.
    started = time.monotonic()
    if wait_healthy(server.url, proc, log, STARTUP_TIMEOUT_S):
        server.extra["startup_s"] = round(time.monotonic() - started, 1)
        return server
    server.stop()
    raise RuntimeError(f"server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> bool:
    """Wait for `GET url/health` to answer 200; False after `timeout` s, RuntimeError if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    return False


def pytest_collection_modifyitems(config, items):
    from .order import reorder

    reorder(items, Path(__file__).parent)


@pytest.fixture(scope="session")
def omni_server(checkpoint, tmp_path_factory, request):
    """`omni_server(family)` -> the running Server for that tiny checkpoint family.

    `omni_server(family, variant=NAME, model=..., env=..., extra=[...])` starts a
    differently configured server of that family (e.g. served from a hub id); it
    is one more "family" for the one-server-at-a-time rule.
    """
    state: dict[str, Server | None] = {"current": None}
    workdir = tmp_path_factory.mktemp("omni-servers")
    media_dir = workdir / "media"
    media_dir.mkdir()
    video_dir = workdir / "videos"

    def get(family: str, variant: str = "", model: str | None = None, env: dict | None = None,
            extra: list[str] | None = None) -> Server:
        current = state["current"]
        key = f"{family}:{variant}" if variant else family
        if current is not None and current.extra.get("key") == key and current.proc.poll() is None:
            return current
        if current is not None:
            current.stop()
            state["current"] = None
        extra = list(extra or [])
        if family == "qwen-image" and not variant:
            extra += ["--omni-max-queue", "2", "--served-model-name", "tiny-qwen-image", "--middleware", BODY_LIMIT]
        elif family == "qwen-image-edit":
            # http(s) image URLs only from 127.0.0.1 (the tests' own media server; a redirect
            # to `localhost` is a hop to a host that is not allowed)
            extra += ["--allowed-local-media-path", str(media_dir), "--allowed-media-domains", "127.0.0.1"]
        elif family in ("qwen-image-edit-plus", "qwen-image-layered", "wan2.2-i2v"):
            extra += ["--allowed-local-media-path", str(media_dir)]
        elif family == "bagel":
            stage_config = workdir / "bagel-stages.yaml"
            stage_config.write_text(BAGEL_STAGE_CONFIG)
            extra += ["--stage-configs-path", str(stage_config), "--max-model-len", "512",
                      "--served-model-name", "tiny-bagel", "--omni-max-queue", "1", "--middleware", BODY_LIMIT]
        elif family == "wan2.2-t2v":
            # first: a variant's own flags (later on the command line) win
            extra = ["--omni-video-dir", str(video_dir), "--omni-video-retention", "6",
                     "--omni-job-store", f"sqlite:///{workdir}/video-jobs.db", *extra]
        elif family == "glm-image":
            stage_config = workdir / "glm-image-stages.yaml"
            stage_config.write_text(GLM_IMAGE_STAGE_CONFIG)
            extra += ["--stage-configs-path", str(stage_config), "--served-model-name", "tiny-glm-image"]
        if model is None:
            # GLM-Image: the deterministic-AR copy the offline Omni of the GLM-Image tests runs.
            model = request.getfixturevalue("glm_image_checkpoint") if family == "glm-image" else checkpoint(family)
        server = start_server(family, model, workdir, extra, use_omni_cli=family == "qwen-image-edit", env=env)
        server.extra.update(media_dir=media_dir, video_dir=video_dir, job_db=workdir / "video-jobs.db", key=key)
        state["current"] = server
        return server

    def stop() -> None:
        """Stop the running server (a test that starts servers of its own calls this first)."""
        if state["current"] is not None:
            state["current"].stop()
            state["current"] = None

    get.stop = stop
    yield get
    stop()


def decoded_md5(data: bytes) -> str:
    import hashlib
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return hashlib.md5(img.tobytes() + img.mode.encode() + str(img.size).encode()).hexdigest()


def first_image_md5(answer) -> str:
    """decoded_md5 of the first image of an answer: an openai ImagesResponse, a ChatCompletion with
    image parts, or the JSON body (dict) of an images route."""
    if isinstance(answer, dict):
        b64 = answer["data"][0]["b64_json"]
    elif hasattr(answer, "choices"):
        b64 = answer.choices[0].message.content[0]["image_url"]["url"].split(",", 1)[1]
    else:
        b64 = answer.data[0].b64_json
    return decoded_md5(base64.b64decode(b64))


def pil_md5(img) -> str:
    import hashlib

    return hashlib.md5(img.tobytes() + img.mode.encode() + str(img.size).encode()).hexdigest()


def png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def striped_image(width: int, height: int):
    """A red image with green vertical stripes every 6 px (an input image with structure)."""
    from PIL import Image

    img = Image.new("RGB", (width, height), (200, 30, 30))
    for x in range(0, width, 6):
        for y in range(height):
            img.putpixel((x, y), (20, 200, 40))
    return img


def assert_aborted_and_idle(server: Server, before: dict, aborted: int, rejected: int, max_steps: int) -> None:
    """After clients hung up: the engine drains to idle, `aborted` / `rejected` requests more than
    `before`, and fewer than `max_steps` engine steps ran (the aborted work was stopped)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["omni_engine_requests_in_flight"] == 0:
            break
        time.sleep(0.2)
    assert m["omni_engine_requests_in_flight"] == 0 and m["omni_engine_requests_running"] == 0
    assert m["omni_engine_requests_aborted"] - before["omni_engine_requests_aborted"] == aborted
    assert m["omni_engine_requests_rejected"] - before["omni_engine_requests_rejected"] == rejected
    steps = m["omni_engine_step_seconds_count"] - before["omni_engine_step_seconds_count"]
    assert steps < max_steps, f"the engine ran {steps} batched steps: the aborted work was not stopped"


def assert_openai_error(server: Server, path: str, body, status: int, param: str | None, fragment: str) -> None:
    """POST `body` as JSON: the answer is `status` with an OpenAI error body naming `param` and saying `fragment`."""
    r = requests.post(server.url + path, json=body, headers=server.headers(), timeout=120)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err
    assert err["param"] == param and err["code"] == status and err["type"].endswith("Error")


def assert_error_shape(r, status: int, fragment: str = "") -> dict:
    """`r` has `status` and an OpenAI error body (message, type, param, code); returns the error."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    # type: ours and the reshaped ones end in "Error"; vLLM's own handlers use the status phrase
    assert err["code"] == status and isinstance(err["message"], str) and isinstance(err["type"], str) and err["type"], err
    assert fragment in err["message"], err
    return err


def assert_framework_errors_shaped(server: Server, completions_422: bool) -> None:
    """What vLLM's and Starlette's own layers answer, in the OpenAI shape: --api-key's 401, unknown
    path 404, wrong method 405, a body limit's 413 (plain text from Starlette), multipart the parser
    refuses (400), and, where vLLM serves /v1/completions, its request-validation 422 / 400."""
    url, auth = server.url, server.headers()
    assert_error_shape(requests.get(url + "/v1/models", timeout=10), 401, "Unauthorized")
    assert_error_shape(requests.post(url + "/v1/images/generations", json={"prompt": "x"},
                                     headers={"Authorization": "Bearer wrong"}, timeout=10), 401)
    assert_error_shape(requests.get(url + "/v1/no-such-route", headers=auth, timeout=10), 404, "Not Found")
    assert_error_shape(requests.get(url + "/v1/images/generations", headers=auth, timeout=10), 405, "Method Not Allowed")
    from .body_limit import LIMIT

    big = requests.post(url + "/v1/images/generations", headers={**auth, "Content-Type": "application/json"},
                        data=b'{"prompt": "' + b"x" * LIMIT + b'"}', timeout=60)
    assert_error_shape(big, 413, "Content Too Large")
    no_boundary = requests.post(url + "/v1/images/edits", data=b"--zz\r\n",
                                headers={**auth, "Content-Type": "multipart/form-data"}, timeout=10)
    assert_error_shape(no_boundary, 400, "boundary")
    huge_field = requests.post(url + "/v1/images/edits", headers=auth, timeout=30,
                               files={"image": ("a.png", b"x", "image/png")}, data={"prompt": "x" * (1024 * 1024 + 1)})
    assert_error_shape(huge_field, 400, "maximum size")
    if completions_422:
        assert_error_shape(requests.post(url + "/v1/completions", json={"model": "x", "prompt": {"a": 1}},
                                         headers=auth, timeout=10), 400)


# ---- streamed images (OpenAI's image stream: test_image_streaming.py and the families' server tests) ----
def b64_png(b64: str):
    """A b64_json field -> the PIL image, checked to be a PNG."""
    import io

    from PIL import Image

    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


def check_image_stream(events: list, prefix: str, n: int, k: int, size: str,
                       background: str = "opaque") -> tuple[list, list]:
    """OpenAI's event order and fields: k partial rounds of n images (a layered answer's layers
    count as its images), then n completed. Returns (partial events, completed events)."""
    partial = [e for e in events if e.type == f"{prefix}.partial_image"]
    completed = [e for e in events if e.type == f"{prefix}.completed"]
    assert len(partial) + len(completed) == len(events) and events[-n:] == completed
    assert [(e.partial_image_index, e.model_extra["index"]) for e in partial] == [
        (i, row) for i in range(k) for row in range(n)]
    assert [e.model_extra["index"] for e in completed] == list(range(n))
    for e in partial + completed:
        assert (e.size, e.output_format, e.background) == (size, "png", background) and e.created_at > 0
        assert b64_png(e.b64_json).size == tuple(int(x) for x in size.split("x"))
    for e in completed:
        assert e.usage.total_tokens == 0  # this server does not meter tokens
    return partial, completed


def offline_partials(omni, params) -> tuple:
    """(the output, pil_md5 of each partial image in event order) of an offline `Omni.generate`."""
    events = []
    (out,) = omni.generate(params, on_event=events.append, use_tqdm=False)
    return out, [pil_md5(img) for e in events if e.kind == "partial" for img in e.output.images]
