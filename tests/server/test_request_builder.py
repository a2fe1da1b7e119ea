"""The canonical-request builder without a server: validation rules, and that
omitted parameters resolve to the pipeline's own defaults exactly as the
engine / offline path resolves them."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from vllm_omni_plugin.diffusion.params import SamplingParams
from vllm_omni_plugin.request import Limits, RequestBuilder, RequestError, build_sampling_params, parse_size


def test_parse_size():
    assert parse_size("64x48") == (64, 48)
    assert parse_size(" 1024 X 768 ") == (1024, 768)
    assert parse_size("auto") is None and parse_size(None) is None
    for bad in ("64", "x64", "64x", "-1x5", "0x5", "1.5x2", 64):
        with pytest.raises(RequestError) as e:
            parse_size(bad)
        assert e.value.param == "size"


def test_form_strings_coerce_and_nulls_are_unset():
    params, out, seconds = build_sampling_params(
        {"prompt": "p", "n": "2", "seed": "5", "guidance_scale": "3.5", "size": None, "cfg_scale": 4}
    )
    assert (params.num_outputs_per_prompt, params.seed, params.guidance_scale, params.true_cfg_scale) == (2, 5, 3.5, 4.0)
    assert params.height is None and params.num_inference_steps is None and seconds is None
    assert out.output_format == "png" and out.response_format == "b64_json"


def test_conflicting_aliases_and_limits():
    with pytest.raises(RequestError, match="conflicts"):
        build_sampling_params({"prompt": "p", "cfg_scale": 4, "true_cfg_scale": 5})
    with pytest.raises(RequestError, match="at most 1"):
        build_sampling_params({"prompt": "p"}, [Image.new("RGB", (4, 4))] * 2, Limits(max_input_images=1))
    with pytest.raises(RequestError, match="above the limit"):
        build_sampling_params({"prompt": "p"}, [Image.new("RGB", (40, 40))], Limits(max_input_pixels=100))


def test_omitted_params_resolve_to_pipeline_defaults(checkpoint):
    from vllm_omni_plugin.omni import Omni

    omni = Omni(str(checkpoint("qwen-image")))
    pipeline = omni.pipeline
    builder = RequestBuilder(pipeline.resolve, pipeline.capabilities, None, Limits())
    canon = builder.build({"prompt": "a cat", "seed": 3}, task="image")
    engine_side = omni.engine.add_request("probe", SamplingParams(prompt="a cat", seed=3))
    omni.engine.abort("probe")
    omni.engine.step()
    assert canon.params == engine_side
    size = pipeline.pipe.default_sample_size * pipeline.pipe.vae_scale_factor
    assert (canon.params.num_inference_steps, canon.params.height, canon.params.width) == (50, size, size)
    assert canon.params.true_cfg_scale is None  # no negative prompt: true CFG does not run, reported off
    # the resolved-size limit applies to defaults too
    small = RequestBuilder(pipeline.resolve, pipeline.capabilities, None,
                           dataclasses.replace(Limits(), max_pixels=size * size - 1))
    with pytest.raises(RequestError, match="resolved size"):
        small.build({"prompt": "a cat"}, task="image")
