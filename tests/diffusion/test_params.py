"""Parameter resolution: request > stage config > pipeline default, None = unset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_omni_plugin.diffusion.params import PipelineDefaults, SamplingParams, resolve

PIPE = PipelineDefaults(values=dict(num_inference_steps=50, true_cfg_scale=4.0, height=1024, width=1024))


def test_precedence_request_over_stage_over_pipeline():
    stage = SamplingParams(num_inference_steps=30, height=512)
    r = resolve(SamplingParams(prompt="p", num_inference_steps=7), stage, PIPE)
    assert r.num_inference_steps == 7  # request
    assert r.height == 512  # stage
    assert r.width == 1024 and r.true_cfg_scale == 4.0  # pipeline


def test_stage_defaults_as_mapping():
    r = resolve(SamplingParams(prompt="p"), {"num_inference_steps": 12, "cfg_normalize": True}, PIPE)
    assert r.num_inference_steps == 12 and r.extra["cfg_normalize"] is True


def test_explicit_zero_is_a_value_not_unset():
    r = resolve(SamplingParams(prompt="p", true_cfg_scale=0.0, guidance_scale=0.0), None, PIPE)
    assert r.true_cfg_scale == 0.0 and r.guidance_scale == 0.0


def test_unset_everywhere_stays_none():
    r = resolve(SamplingParams(prompt="p"), None, PIPE)
    assert r.guidance_scale is None and r.negative_prompt is None and r.num_frames is None


def test_cfg_scale_alias():
    assert SamplingParams(cfg_scale=3.5).true_cfg_scale == 3.5
    assert resolve(SamplingParams(prompt="p", cfg_scale=2.0), None, PIPE).true_cfg_scale == 2.0
    assert SamplingParams.from_dict({"cfg_scale": 6.0}).true_cfg_scale == 6.0
    with pytest.raises(ValueError, match="alias"):
        SamplingParams(cfg_scale=2.0, true_cfg_scale=3.0)


def test_shared_defaults_are_never_mutated():
    stage = SamplingParams(num_inference_steps=30, extra={"k": 1})
    stage_before = dataclasses.replace(stage, extra=dict(stage.extra))
    pipe_values = dict(PIPE.values)
    request = SamplingParams(prompt="p", height=64)
    a = resolve(request, stage, PIPE)
    b = resolve(SamplingParams(prompt="q"), stage, PIPE)
    assert stage == stage_before and dict(PIPE.values) == pipe_values
    assert request == SamplingParams(prompt="p", height=64)
    assert a is not b and a.height == 64 and b.height == 1024


def test_derived_values_come_from_resolved_values():
    seen = {}

    def derive(v, explicit):
        seen.update(v)
        return {"guidance_scale_2": v["guidance_scale"]}

    pipe = PipelineDefaults(values=dict(num_inference_steps=40, guidance_scale=4.0), derive=derive)
    # unset guidance_scale: derived from the pipeline default, not from None / 0
    assert resolve(SamplingParams(prompt="p"), None, pipe).guidance_scale_2 == 4.0
    assert resolve(SamplingParams(prompt="p"), {"guidance_scale": 6.0}, pipe).guidance_scale_2 == 6.0
    assert seen["num_inference_steps"] == 40


def test_seed_is_a_cpu_generator_like_diffusers_users_make():
    r = resolve(SamplingParams(prompt="p", seed=1234), None, PIPE)
    ours = torch.randn(5, generator=r.generator())
    theirs = torch.randn(5, generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.randn(3, generator=r.generator()), torch.randn(3, generator=r.generator()))


def test_unseeded_request_records_the_seed_it_ran_with():
    a = resolve(SamplingParams(prompt="p"), None, PIPE)
    b = resolve(SamplingParams(prompt="p"), None, PIPE)
    assert isinstance(a.seed, int) and a.seed != b.seed


def test_defaults_of_n_and_output_type():
    r = resolve(SamplingParams(prompt="p"), None, PIPE)
    assert r.num_outputs_per_prompt == 1 and r.output_type == "pil"


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_inference_steps=0),
        dict(height=-8),
        dict(num_outputs_per_prompt=1.5),
        dict(output_type="gif"),
        dict(seed=-1),
        dict(guidance_scale="high"),
    ],
)
def test_bad_values_fail_clearly(bad):
    with pytest.raises(ValueError):
        resolve(SamplingParams(prompt="p", **bad), None, PIPE)


def test_missing_step_default_is_an_error_not_a_magic_number():
    with pytest.raises(ValueError, match="num_inference_steps"):
        resolve(SamplingParams(prompt="p"), None, PipelineDefaults(values={}))


def test_from_dict_keeps_unknown_keys_as_extra():
    p = SamplingParams.from_dict({"prompt": "x", "layers": 3, "cfg_normalize": True})
    assert p.layers == 3 and p.extra == {"cfg_normalize": True}
