"""Offline API: Omni(model=PATH).generate(prompts, params) and mp4 export."""

from __future__ import annotations

import av
import numpy as np
import pytest

from pixels import seeded
from vllm_omni_plugin import Omni
from vllm_omni_plugin.diffusion import SamplingParams


@pytest.fixture(scope="module")
def omni(checkpoint):
    return Omni(model=str(checkpoint("qwen-image")), device="cpu", stage_defaults={"num_inference_steps": 2})


def test_generate_returns_one_output_per_prompt_with_resolved_params(omni):
    params = SamplingParams(height=64, width=64, seed=3)
    outs = omni.generate(["a cat", "a much longer prompt about a dog"], params)
    assert [o.params.prompt for o in outs] == ["a cat", "a much longer prompt about a dog"]
    assert all(o.params.num_inference_steps == 2 for o in outs)  # stage default
    assert outs[0].images[0].size == (64, 64)
    assert params.prompt is None  # the caller's params object is not mutated


def test_generate_equals_diffusers(omni):
    out = omni.generate("a cat", SamplingParams(height=64, width=64, seed=9))[0]
    ref = omni.pipeline.pipe(prompt="a cat", height=64, width=64, num_inference_steps=2, generator=seeded(9))
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))


def test_dict_prompts_and_errors(omni):
    out = omni.generate([{"prompt": "x", "seed": 1, "height": 32, "width": 32}])[0]
    assert out.params.seed == 1
    with pytest.raises(ValueError):
        omni.generate("x", SamplingParams(num_inference_steps=0))


def test_mp4_export(pipeline, tmp_path):
    pipe = pipeline("wan2.2-t2v")
    out = pipe.generate(SamplingParams(prompt="a dog", height=32, width=48, num_frames=5, num_inference_steps=2,
                                       seed=0))
    path = out.save_mp4(tmp_path / "v.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (stream.average_rate, stream.width, stream.height) == (16, 48, 32)
    assert len(frames) == 5


def test_diffusion_engine_imports_no_vllm():
    import subprocess
    import sys

    code = (
        "import sys, vllm_omni_plugin.omni, vllm_omni_plugin.families.qwen_image.pipeline, "
        "vllm_omni_plugin.families.wan.pipeline, vllm_omni_plugin.diffusion.pipelines.generic; "
        "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
