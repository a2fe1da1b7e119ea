"""The protocol models of the omni bodies (request/protocol.py), without a server: they carry
OpenAI's names and types, describe every field, and validate with the request layer's own rules --
never pydantic's lax coercions (an "Infinity" float, 2.5 as an int, "1e999")."""

from __future__ import annotations

import typing

import pytest
from openai.types import image_edit_params, image_generate_params, video_create_params

from vllm_omni_plugin.diffusion.capabilities import Knob
from vllm_omni_plugin.request import Limits, RequestError
from vllm_omni_plugin.request.protocol import (
    FIELDS,
    ROUTE_BODIES,
    GenerationParams,
    ImageEditForm,
    ImageGenerationRequest,
    VideoCreateRequest,
    openapi_components,
    validate_generation,
)

# OpenAI fields this server does not take (a 400 naming them, as any unknown field): GIF / SVG
# output, the newer safety identifier and planning effort.
NOT_TAKEN = {"complexity", "frame_count", "frame_duration_ms", "safety_identifier", "svg", "markup", "mask"}


@pytest.mark.parametrize(("openai_params", "ours"), [
    (image_generate_params.ImageGenerateParamsBase, ImageGenerationRequest),
    (image_edit_params.ImageEditParamsBase, ImageEditForm),
    (video_create_params.VideoCreateParams, VideoCreateRequest),
])
def test_openai_field_names_are_ours(openai_params, ours):
    names = set(typing.get_type_hints(openai_params)) - NOT_TAKEN
    assert names <= set(ours.model_fields), names - set(ours.model_fields)
    required = {n for n, f in ours.model_fields.items() if f.is_required()}
    assert required <= set(typing.get_type_hints(openai_params)) | {"images"}


def test_every_field_of_every_body_is_described():
    for bodies in ROUTE_BODIES.values():
        for model in bodies.values():
            undescribed = [n for n, f in model.model_fields.items() if not f.description]
            assert not undescribed, (model.__name__, undescribed)


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"n": 2.5}, "n", "must be an integer"),
    ({"n": "2.0"}, "n", "must be an integer"),
    ({"n": True}, "n", "must be an integer"),
    ({"n": 0}, "n", "positive integer"),
    ({"seed": "1e999"}, "seed", "must be an integer"),
    ({"seed": 2**64}, "seed", "2**64"),
    ({"guidance_scale": "Infinity"}, "guidance_scale", "finite"),
    ({"guidance_scale": "NaN"}, "guidance_scale", "finite"),
    ({"guidance_scale": 101}, "guidance_scale", "within [0, 100]"),
    ({"true_cfg_scale": 1e308}, "true_cfg_scale", "within"),
    ({"cache_threshold": [1]}, "cache_threshold", "must be a number"),
    ({"prompt": "\ud800"}, "prompt", "lone surrogate"),
    ({"quality": 5}, "quality", "must be a string"),
    ({"output_format": "gif"}, "output_format", "png, jpeg, webp"),
    ({"background": "none"}, "background", "auto, opaque, transparent"),
    ({"output_compression": 101}, "output_compression", "within [0, 100]"),
    ({"size": 64}, "size", "WIDTHxHEIGHT"),
])
def test_the_models_do_not_loosen_the_request_layer(fields, param, message):
    with pytest.raises(RequestError) as e:
        validate_generation({"prompt": "p", **fields}, Limits())
    assert e.value.param == param and message in e.value.message and e.value.status == 400


def test_form_strings_and_json_values_validate_alike():
    form = validate_generation({"prompt": "p", "n": "2", "seed": "7", "guidance_scale": "3.5", "seconds": "4"}, Limits())
    body = validate_generation({"prompt": "p", "n": 2, "seed": 7, "guidance_scale": 3.5, "seconds": 4}, Limits())
    assert form == body and (body.n, body.seed, body.guidance_scale, body.seconds) == (2, 7, 3.5, 4.0)
    assert validate_generation({"output_format": "jpg"}, Limits()).output_format == "jpeg"
    assert set(GenerationParams.model_fields) == FIELDS


def test_the_served_models_knobs_join_every_body_schema():
    knobs = {"cfg_interval": Knob(tuple, length=2, description="where CFG runs"), "flag": Knob(bool)}
    schemas = openapi_components(knobs)
    for bodies in ROUTE_BODIES.values():
        for model in bodies.values():
            props = schemas[model.__name__]["properties"]
            assert props["cfg_interval"] == {"type": "array", "items": {"type": "number"}, "minItems": 2,
                                             "maxItems": 2, "description": "where CFG runs"}
            assert props["flag"]["type"] == "boolean" and props["flag"]["description"]
    assert "cfg_interval" not in openapi_components()["ImageGenerationRequest"]["properties"]
