"""GLM-Image end to end through the multi-stage Omni: AR stage in vLLM -> prior tokens + grid -> DiT stage.

Oracle: diffusers' own `GlmImagePipeline` (its AR model in transformers) on the
same tiny checkpoint, whose generation_config.json has top_k=1 so both AR
stages take the arg-max token (glm_image_checkpoint fixture). Pixel for pixel,
at three sizes including a non-square one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batching import assert_batched_equals_alone
from vllm_omni_plugin.diffusion.params import SamplingParams

STEPS = 3
PROMPT = 'A "GLM" sign on a red wall'
# (height, width): square, another square, non-square (768x1344 scaled by 1/3).
SIZES = [(256, 256), (384, 384), (256, 448)]


@pytest.fixture(scope="module")
def reference(glm_image_checkpoint):
    from diffusers import GlmImagePipeline

    pipe = GlmImagePipeline.from_pretrained(str(glm_image_checkpoint), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, height: int, width: int, seed: int) -> np.ndarray:
    out = pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=STEPS,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return np.asarray(out.images[0])


def _ours(omni, height: int, width: int, seed: int) -> np.ndarray:
    (out,) = omni.generate([PROMPT], SamplingParams(height=height, width=width, num_inference_steps=STEPS, seed=seed))
    return np.asarray(out.images[0])


@pytest.mark.parametrize("height,width", SIZES)
def test_pipeline_equals_diffusers_pixel_for_pixel(glm_omni, reference, height, width):
    ours = _ours(glm_omni, height, width, seed=4)
    assert ours.shape == (height, width, 3)
    np.testing.assert_array_equal(ours, _reference(reference, height, width, seed=4))
    assert ours.std() > 1  # a real image, not a constant


def test_concurrent_requests_of_different_sizes_get_their_own(glm_omni):
    a, b = (256, 448), (384, 384)
    together = glm_omni.generate(
        [PROMPT, PROMPT],
        [SamplingParams(height=h, width=w, num_inference_steps=STEPS, seed=s) for (h, w), s in ((a, 11), (b, 12))],
    )
    for out, (h, w), seed in zip(together, (a, b), (11, 12)):
        assert out.images[0].size == (w, h)
        assert (out.params.height, out.params.width) == (h, w)
        assert_batched_equals_alone(np.asarray(out.images[0]), _ours(glm_omni, h, w, seed))


def test_a_size_it_cannot_render_is_refused_with_the_allowed_sizes(glm_omni):
    with pytest.raises(ValueError, match="multiples of 32 between 256 and 2048"):
        glm_omni.generate([PROMPT], SamplingParams(height=250, width=256, num_inference_steps=STEPS, seed=0))


def _reference_i2i(pipe, image, height: int, width: int, seed: int) -> np.ndarray:
    """diffusers' GlmImagePipeline with its AR step (`generate_prior_tokens`) done outside it, line for line,
    except one call: diffusers 0.42.1 concatenates the per-image features before
    `get_image_tokens`, which transformers 5.19 iterates per image (a shape error); here
    they go in as the list it takes."""
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]]
    inputs = pipe.processor.apply_chat_template(messages, tokenize=True, target_h=height, target_w=width,
                                                return_dict=True, return_tensors="pt")
    vle = pipe.vision_language_encoder
    source = inputs["image_grid_thw"][:-1]
    codes = vle.get_image_tokens(vle.get_image_features(inputs["pixel_values"], source).pooler_output, source)
    _, sh, sw = source[0].tolist()
    source_ids = pipe._upsample_token_ids(codes, sh, sw).squeeze(0)
    source_grid = source.clone()
    source_grid[:, 1:] *= 2
    h, w = height // 32, width // 32
    torch.manual_seed(seed)
    with torch.no_grad():
        out = vle.generate(**inputs, max_new_tokens=h * w + 1, do_sample=True)  # top_k=1: greedy
    prior = pipe._upsample_token_ids(out[0, inputs["input_ids"].shape[1] :][: h * w], h, w)
    result = pipe(prompt=PROMPT, image=[image], height=height, width=width, num_inference_steps=STEPS,
                  generator=torch.Generator("cpu").manual_seed(seed), prior_token_ids=prior,
                  prior_token_image_ids=[source_ids], source_image_grid_thw=[source_grid])
    return np.asarray(result.images[0])


def test_image_to_image_equals_diffusers_pixel_for_pixel(glm_omni, reference):
    from test_glm_image_vllm import source_image

    height, width = 256, 320
    (out,) = glm_omni.generate([PROMPT], SamplingParams(images=[source_image()], height=height, width=width,
                                                        num_inference_steps=STEPS, seed=5))
    ours = np.asarray(out.images[0])
    assert ours.shape == (height, width, 3)
    np.testing.assert_array_equal(ours, _reference_i2i(reference, source_image(), height, width, seed=5))
    # The source image conditions the result: text-to-image at the same size and seed differs.
    assert not np.array_equal(ours, _ours(glm_omni, height, width, seed=5))


def test_dit_x0_estimate_at_the_last_step_is_the_final_latent(checkpoint):
    """Streaming partial images (the DiT stage alone, a hand-made prior): flow matching's
    x0 = x_t - sigma v (the base x0_estimate on the request's own scheduler) before each step; at
    the last step (sigma_next = 0) the scheduler's Euler step is the same operation, so x0 equals
    the final latent; decode_partial of it is the final image's pixels."""
    from vllm_omni_plugin.families.glm_image.pipeline import GlmImagePrior, load_glm_image_pipeline

    pipe = load_glm_image_pipeline(checkpoint("glm-image"), dtype=torch.float32, device="cpu")
    prior = GlmImagePrior("r", tuple(i % 7 for i in range(64)), (8, 8))
    params = pipe.resolve(SamplingParams(prompt=PROMPT, height=256, width=256, seed=3, num_inference_steps=STEPS))
    state = pipe.prepare(params, "r", prior)
    x0s = []
    while not state.done:
        (v,) = pipe.denoise_step([state])
        x0s.append(pipe.x0_estimate(state, v))
        pipe.scheduler_step([state], [v])
    assert torch.equal(x0s[-1], state.latents)
    assert not torch.equal(x0s[0], state.latents)
    final = pipe.decode(state).images[0]
    (partial,) = pipe.decode_partial(state.latents, params)
    assert np.array_equal(np.asarray(partial), np.asarray(final))
