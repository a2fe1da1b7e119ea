"""Per-request LoRA over HTTP (real server, real openai client): `model: NAME`, the `lora` field,
--omni-lora / --omni-lora-dirs, vLLM's load / unload routes, /v1/models, and the path rules.

The oracle for the pixels is the offline `Omni(..., loras=...)` with the same request, byte for
byte (the engine-level oracle against diffusers' own set_adapters: tests/diffusion/test_lora.py).
"""

from __future__ import annotations

import json
import os

import openai
import pytest
import requests
import torch

from .conftest import STAGE_DEFAULTS, first_image_md5, pil_md5

PROMPT = "a lora cat"


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    from diffusers import DiffusionPipeline

    from vllm_omni_plugin.checkpoints.lora import make_lora

    pipe = DiffusionPipeline.from_pretrained(checkpoint("qwen-image"), torch_dtype=torch.float32)
    root = tmp_path_factory.mktemp("lora-dir")
    elsewhere = tmp_path_factory.mktemp("lora-elsewhere")
    return {
        "start": make_lora(pipe, elsewhere / "start", rank=4, alpha=8, seed=1, magnitude=0.1),  # via --omni-lora
        "runtime": make_lora(pipe, root / "runtime", rank=2, seed=2, magnitude=0.2),  # via the load route
        "outside": make_lora(pipe, elsewhere / "outside", rank=2, seed=3),
        "root": root,
    }


@pytest.fixture(scope="module")
def server(omni_server, adapters):
    return omni_server("qwen-image", variant="lora", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, extra=[
        "--served-model-name", "tiny-qwen-image", "--omni-lora", f"style={adapters['start']}",
        "--omni-lora-dirs", str(adapters["root"]), "--omni-max-loras", "2"])


def _generate(client, model=None, lora=None):
    body = {"seed": 3, **({"lora": lora} if lora is not None else {})}
    return client.images.generate(prompt=PROMPT, size="64x64", response_format="b64_json", extra_body=body,
                                  **({"model": model} if model else {}))


def test_lora_per_request_over_http(server, adapters, checkpoint):
    from vllm_omni_plugin.diffusion import SamplingParams
    from vllm_omni_plugin.omni import Omni

    client = server.client()
    listed = {m.id: m for m in client.models.list().data}
    assert listed["style"].parent == "tiny-qwen-image" and listed["style"].root == str(adapters["start"])

    base = _generate(client)
    by_model = _generate(client, model="style")
    by_field = _generate(client, lora=[{"name": "style", "scale": 1.0}])
    half = _generate(client, lora=[{"name": "style", "scale": 0.5}])
    assert first_image_md5(by_model) == first_image_md5(by_field) != first_image_md5(base)
    assert first_image_md5(half) not in (first_image_md5(base), first_image_md5(by_model))
    assert by_model.model_extra["omni"]["resolved"]["lora"] == [{"name": "style", "scale": 1.0}]
    assert base.model_extra["omni"]["resolved"]["lora"] is None

    # offline Omni with the same adapter and request: the same bytes
    omni = Omni(str(checkpoint("qwen-image")), stage_defaults=json.loads(STAGE_DEFAULTS["qwen-image"]),
                loras={"style": str(adapters["start"])})
    try:
        [out] = omni.generate(SamplingParams(prompt=PROMPT, height=64, width=64, seed=3, lora=[("style", 0.5)]))
        assert pil_md5(out.images[0]) == first_image_md5(half)
    finally:
        omni.shutdown()

    with pytest.raises(openai.BadRequestError) as err:
        _generate(client, lora=[{"name": "nope", "scale": 1.0}])
    assert err.value.body["param"] == "lora" and "unknown LoRA adapter 'nope'" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        _generate(client, model="nope")


def test_load_unload_routes_and_path_rules(server, adapters):
    url, headers = server.url, server.headers()
    # --api-key holds for these routes too
    assert requests.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"}).status_code == 401

    def load(name, path):
        return requests.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                             headers=headers, timeout=60)

    r = load("runtime", adapters["runtime"])
    assert r.status_code == 200 and "added successfully" in r.text
    client = server.client()
    assert "runtime" in {m.id for m in client.models.list().data}
    assert _generate(client, model="runtime").data[0].b64_json

    refused = {
        "outside": (adapters["outside"], "outside the directories allowed"),
        "link": (adapters["root"] / "link.safetensors", "a symlink there leads out"),
        "bin": (adapters["root"] / "w.bin", "not a .safetensors file"),
    }
    os.symlink(adapters["outside"], adapters["root"] / "link.safetensors")
    (adapters["root"] / "w.bin").write_bytes(b"\0" * 8)
    for name, (path, fragment) in refused.items():
        r = load(name, path)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], (name, r.text)
        assert r.json()["error"]["param"] == "lora_path"
    assert load("runtime", adapters["runtime"]).status_code == 400  # already loaded

    r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "runtime"}, headers=headers, timeout=60)
    assert r.status_code == 200
    assert "runtime" not in {m.id for m in client.models.list().data}
    r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "runtime"}, headers=headers, timeout=60)
    assert r.status_code == 404


def test_lora_flags_refused_with_the_fix(checkpoint, tmp_path):
    from vllm_omni_plugin.server.config import ConfigError, OmniServerConfig
    from vllm_omni_plugin.server.flags import parse_args

    model = str(checkpoint("qwen-image"))
    config = OmniServerConfig.from_args(parse_args([model, "--omni-lora", "a=/x/a.safetensors", "--omni-lora-dirs",
                                                    str(tmp_path), "--omni-max-loras", "3"]))
    assert config.loras == (("a", "/x/a.safetensors"),) and config.lora_policy.max_loras == 3
    assert config.lora_policy.allowed_dirs == (str(tmp_path),)
    assert OmniServerConfig.from_args(parse_args([model])).lora_policy is None  # LoRA off unless asked for
    for argv, fragment in [
        (["--omni-lora", "no-equals-sign"], "write NAME=PATH"),
        (["--omni-lora", "a=/p", "--omni-lora", "a=/q"], "already taken"),
        (["--omni-lora-dirs", str(tmp_path / "missing")], "no such directory"),
        (["--omni-lora", "a=/p", "--omni-lora", "b=/q", "--omni-max-loras", "1"], "--omni-max-loras 1"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            OmniServerConfig.from_args(parse_args([model, *argv]))


def test_unloading_an_adapter_in_use_is_refused(server, adapters):
    import threading
    import time

    url, headers = server.url, server.headers()
    r = requests.post(url + "/v1/load_lora_adapter", headers=headers, timeout=60,
                      json={"lora_name": "busy", "lora_path": str(adapters["runtime"])})
    assert r.status_code == 200, r.text
    client = server.client()
    answers = []
    worker = threading.Thread(target=lambda: answers.append(client.images.generate(
        model="busy", prompt=PROMPT, size="64x64", extra_body={"seed": 1, "num_inference_steps": 150})))
    worker.start()
    deadline = time.monotonic() + 60
    while requests.get(url + "/load", headers=headers, timeout=10).json()["server_load"] == 0:
        assert worker.is_alive() and time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.05)
    r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "busy"}, headers=headers, timeout=60)
    assert r.status_code == 409 and "in use by 1" in r.json()["error"]["message"], r.text
    worker.join(120)
    assert answers and answers[0].model_extra["omni"]["resolved"]["lora"] == [{"name": "busy", "scale": 1.0}]
    r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "busy"}, headers=headers, timeout=60)
    assert r.status_code == 200  # once the request is done
