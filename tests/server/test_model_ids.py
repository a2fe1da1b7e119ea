"""Hub model ids on both entry points, offline: `vllm serve ORG/NAME --omni` and `Omni("ORG/NAME")`
resolve through huggingface_hub's cache (HF_HOME, --download-dir, --revision, HF_HUB_OFFLINE=1)
exactly as vLLM resolves a model, from a cache populated with generated checkpoints in the
hub's own layout (models--ORG--NAME/{blobs,snapshots/<commit>,refs/<revision>}).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
import requests

from vllm_omni_plugin.checkpoints.hub_cache import install_in_hub_cache
from vllm_omni_plugin.diffusion.params import SamplingParams
from vllm_omni_plugin.hub import ModelNotFoundError, resolve_model

from .conftest import STAGE_DEFAULTS, VLLM, decoded_md5, pil_md5

pytestmark = pytest.mark.engine

REPO = "Qwen/Qwen-Image"


@pytest.fixture(scope="module")
def hub(checkpoint, tmp_path_factory):
    """An HF_HOME whose hub cache holds REPO at `main` (seed 0) and at tag `v2` (seed 1)."""
    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    main = install_in_hub_cache(checkpoint("qwen-image"), cache, REPO)
    v2 = install_in_hub_cache(checkpoint("qwen-image", seed=1), cache, REPO, revision="v2")
    assert main != v2 and (main / "model_index.json").is_symlink()
    return {"home": home, "cache": cache, "main": main, "v2": v2}


def test_ids_resolve_from_the_cache_by_revision(hub):
    cache = hub["cache"]
    assert resolve_model(REPO, download_dir=cache) == hub["main"]
    assert resolve_model(REPO, revision="v2", download_dir=cache) == hub["v2"]
    assert resolve_model(REPO, revision=hub["v2"].name, download_dir=cache) == hub["v2"]  # a commit id
    assert resolve_model(str(hub["v2"])) == hub["v2"]  # a local directory is used as it is
    # HF_HOME picks the cache when nothing else does (a fresh process: huggingface_hub reads it at import)
    code = f"from vllm_omni_plugin.hub import resolve_model; print(resolve_model({REPO!r}))"
    env = dict(os.environ, HF_HOME=str(hub["home"]), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(hub["main"])


def test_a_missing_model_is_one_error_naming_what_was_looked_for(hub):
    cache = hub["cache"]
    for model, revision in (("Org/Missing", None), (REPO, "v9")):
        with pytest.raises(ModelNotFoundError) as e:
            resolve_model(model, revision=revision, download_dir=cache)
        message = str(e.value)
        assert repr(model) in message and repr(revision or "main") in message and str(cache) in message
        assert "HF_HUB_OFFLINE=1" in message
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face repo id"):
        resolve_model("/no/such/dir/at/all")


def test_server_and_offline_serve_a_hub_id_identically(omni_server, hub):
    """`vllm serve Qwen/Qwen-Image --omni --download-dir CACHE --revision v2` (HF_HOME pointing at an
    empty cache: the flag wins) == `Omni("Qwen/Qwen-Image", revision="v2", download_dir=CACHE)`."""
    from vllm_omni_plugin.omni import Omni

    empty = hub["home"].parent / "empty-hf-home"
    empty.mkdir(exist_ok=True)
    server = omni_server("qwen-image", variant="hub-v2", model=REPO, env={"HF_HOME": str(empty)},
                         extra=["--download-dir", str(hub["cache"]), "--revision", "v2"])
    models = requests.get(server.url + "/v1/models", headers=server.headers(), timeout=30).json()
    assert [m["id"] for m in models["data"]] == [REPO]  # the id as given, as vLLM names it
    assert models["data"][0]["root"] == str(hub["v2"])

    http = server.client().images.generate(model=REPO, prompt="a red cat", extra_body={"seed": 5})
    omni = Omni(REPO, revision="v2", download_dir=str(hub["cache"]),
                stage_defaults=json.loads(STAGE_DEFAULTS["qwen-image"]))
    assert omni.path == str(hub["v2"])
    off = omni.generate("a red cat", SamplingParams(seed=5))[0]
    assert decoded_md5(base64.b64decode(http.data[0].b64_json)) == pil_md5(off.images[0])
    main = Omni(REPO, download_dir=str(hub["cache"]), stage_defaults=json.loads(STAGE_DEFAULTS["qwen-image"]))
    other = main.generate("a red cat", SamplingParams(seed=5))[0]
    assert pil_md5(other.images[0]) != pil_md5(off.images[0])  # another revision, other weights


def test_server_with_a_missing_model_exits_with_one_clear_error(hub, tmp_path):
    env = dict(os.environ, HF_HOME=str(hub["home"]), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([str(VLLM), "serve", "Org/Missing", "--omni", "--revision", "v3", "--port", "0"],
                         env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode != 0
    err = out.stderr
    assert err.count("was not found") == 1, err[-3000:]
    assert "'Org/Missing'" in err and "'v3'" in err and str(hub["home"] / "hub") in err
    assert "Traceback" not in err, err[-3000:]
