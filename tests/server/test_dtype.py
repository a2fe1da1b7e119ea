"""The dtype a model runs in, reported in every answer's `omni.dtypes` and on offline outputs:
the dtype of the weights the engine loaded (read off an engine here, never written down), and
`--dtype` / `dtype=` change it (real server, openai client)."""

from __future__ import annotations

import json

import pytest

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import STAGE_DEFAULTS
from .offline import offline

pytestmark = pytest.mark.engine


def _weights_dtype(omni) -> str:
    """The dtype of the DiT weights the offline engine holds."""
    param = next(omni.pipeline.pipe.transformer.parameters())
    return str(param.dtype).removeprefix("torch.")


def test_answers_report_the_dtype_of_the_loaded_weights(omni_server, checkpoint):
    client = omni_server("qwen-image").client()
    http = client.images.generate(prompt="a red cat", extra_body={"seed": 1})
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "a red cat"}], model="tiny-qwen-image",
                                          extra_body={"seed": 1})
    omni = offline(checkpoint, "qwen-image")
    (off,) = omni.generate("a red cat", SamplingParams(seed=1))

    loaded = _weights_dtype(omni)
    assert off.dtypes == {"diffusion": loaded}
    assert http.model_extra["omni"]["dtypes"] == off.dtypes
    assert chat.model_extra["omni"]["dtypes"] == off.dtypes
    assert client.models.list().data[0].model_extra["omni"]["dtype"] == loaded


def test_dtype_flag_changes_the_reported_dtype(omni_server, checkpoint):
    from vllm_omni_plugin.omni import Omni

    default = offline(checkpoint, "qwen-image")
    omni = Omni(str(checkpoint("qwen-image")), dtype="bfloat16", stage_defaults=json.loads(STAGE_DEFAULTS["qwen-image"]))
    try:
        (off,) = omni.generate("a red cat", SamplingParams(seed=1))
        loaded = _weights_dtype(omni)
    finally:
        omni.shutdown()
    assert loaded != _weights_dtype(default)  # the argument changed what was loaded
    assert off.dtypes == {"diffusion": loaded}

    client = omni_server("qwen-image", variant="bf16", extra=["--dtype", "bfloat16"]).client()
    http = client.images.generate(prompt="a red cat", extra_body={"seed": 1})
    assert http.model_extra["omni"]["dtypes"] == {"diffusion": loaded}
    assert client.models.list().data[0].model_extra["omni"]["dtype"] == loaded
