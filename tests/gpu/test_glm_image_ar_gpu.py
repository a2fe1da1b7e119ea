"""GLM-Image's AR prior at its real dimensions in the CUDA build of vLLM (plain `vllm.LLM`, bf16,
torch.compile and CUDA graphs at vLLM's defaults), against transformers'
`GlmImageForConditionalGeneration` on the same weights.

What CUDA graphs change here: the decode steps replay captured graphs, so the M-RoPE decode
positions of each image-grid token come from the lookup table that
`models/glm_image_positions.py` keeps on the device for capture (the CPU tests run eager). Two
requests of different target sizes decode in one batch, each from its own slot of that table.

Oracle: transformers' own `generate` (its prompt positions and the decode positions it caches),
float32 on the bf16-exact weights, teacher-forced on vLLM's tokens: at every generated position
the reference's logprob of vLLM's token, its arg-max and its top-2 margin. vLLM's greedy token must
be the reference's arg-max wherever that margin exceeds the variant's `margin`, and the mean / max
|logprob diff| stay under its bounds. Variants (one engine each; `-k` picks one):
  float32   vLLM in float32 with CUDA graphs, both sizes in one batch: the exact oracle (only
            summation order differs), so a wrong position or slot shows as a large error;
  bfloat16  the deployed dtype, CUDA graphs, one batch; bounds of the BAGEL GPU tests;
  bf16-eager-single  bf16, no compile or graphs, one request at a time: with the first two it
            separates precision from the graph-captured lookup and from batching.
2026-12-01 (H200): the bfloat16 variant measured mean 0.286 / max 1.80 at 512x512, 5 of 55
decisive positions disagreeing (docs/benchmarks.md); the other two had not run yet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_glm_image_vllm import _our_prompt_ids, _reference_inputs

from .conftest import report

pytestmark = pytest.mark.gpu

# (height, width): a square and a non-square target.
SIZES = [(512, 512), (384, 640)]
# The shipped stage config's AR engine_args (stage_configs/glm_image.yaml) plus a GPU share for
# the weights (~21 GB in bf16, ~42 GB in float32) and the KV cache; the float32 reference loads
# after the engine has shut down.
BASE_ARGS = {"max_model_len": 8192, "seed": 0}
VARIANTS = {
    "float32": dict(args={"dtype": "float32", "gpu_memory_utilization": 0.45}, batched=True,
                    mean=0.01, max=0.1, margin=0.05),
    "bfloat16": dict(args={"dtype": "bfloat16", "gpu_memory_utilization": 0.30}, batched=True,
                     mean=0.08, max=0.6, margin=0.5),
    "bf16-eager-single": dict(args={"dtype": "bfloat16", "gpu_memory_utilization": 0.30, "enforce_eager": True},
                              batched=False, mean=0.08, max=0.6, margin=0.5),
}


def _worker_facts(worker) -> dict:
    config = worker.vllm_config
    return {
        "model_class": type(worker.model_runner.get_model()).__name__,
        "model_module": type(worker.model_runner.get_model()).__module__,
        "enforce_eager": config.model_config.enforce_eager,
        "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
        "compilation_mode": str(config.compilation_config.mode),
    }


def _n_tokens(height: int, width: int) -> int:
    from vllm_omni_plugin.families.glm_image.prompt import target_grids

    return sum(h * w for h, w in target_grids(height, width, text_to_image=True).decode_grids) + 1


def _vllm_greedy(ckpt, name: str, variant: dict) -> list[tuple[list[int], np.ndarray]]:
    """(tokens, logprob of each) per size (in one generate call if `batched`); the engine is shut down after."""
    from vllm import LLM, SamplingParams

    args = {**BASE_ARGS, **variant["args"]}
    llm = LLM(model=str(ckpt / "vision_language_encoder"), tokenizer=str(ckpt / "processor"), **args)
    try:
        (facts,) = llm.collective_rpc(_worker_facts)
        report(f"glm_ar_gpu_worker_{name}", **facts)
        assert facts["model_module"].startswith("vllm_omni_plugin.")  # the plugin's model, not a fallback
        eager = bool(args.get("enforce_eager"))
        assert facts["enforce_eager"] is eager and ("NONE" in facts["cudagraph_mode"].upper()) is eager
        prompts = [{"prompt_token_ids": _our_prompt_ids(ckpt, h, w)} for h, w in SIZES]
        params = [SamplingParams(temperature=0.0, max_tokens=_n_tokens(h, w), logprobs=0) for h, w in SIZES]
        if variant["batched"]:
            outs = llm.generate(prompts, params, use_tqdm=False)
        else:
            outs = [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
        result = []
        for out in outs:
            ids = list(out.outputs[0].token_ids)
            lps = np.asarray([d[t].logprob for t, d in zip(ids, out.outputs[0].logprobs)])
            result.append((ids, lps))
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _reference_teacher_forced(model, ckpt, height: int, width: int, tokens: list[int]):
    """transformers' generate forced onto `tokens`: (logprob of each token, arg-max, top-2 margin) per step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    rows: list[torch.Tensor] = []

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = len(rows)
            rows.append(scores[0].float().log_softmax(-1).cpu())
            forced = torch.full_like(scores, float("-inf"))
            forced[:, tokens[step]] = 0.0
            return forced

    inputs = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in _reference_inputs(ckpt, height, width).items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=len(tokens), do_sample=False,
                             logits_processor=LogitsProcessorList([Force()]))
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == tokens
    logp = torch.stack(rows)  # [steps, vocab]
    chosen = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    top2 = logp.topk(2, dim=-1)
    return chosen.numpy(), top2.indices[:, 0].numpy(), (top2.values[:, 0] - top2.values[:, 1]).numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_glm_image_ar_in_vllm_matches_transformers(full_glm_image, name):
    from transformers import GlmImageForConditionalGeneration

    variant = VARIANTS[name]
    ours = _vllm_greedy(full_glm_image, name, variant)
    model = GlmImageForConditionalGeneration.from_pretrained(
        full_glm_image / "vision_language_encoder", dtype=torch.float32).to("cuda").eval()
    try:
        failures = []
        for (height, width), (tokens, lps) in zip(SIZES, ours):
            assert len(tokens) == _n_tokens(height, width)
            assert max(tokens) < model.config.text_config.vision_vocab_size  # image tokens only
            ref_lp, ref_argmax, margin = _reference_teacher_forced(model, full_glm_image, height, width, tokens)
            diff = np.abs(lps - ref_lp)
            decisive = margin > variant["margin"]
            disagreements = int((decisive & (ref_argmax != np.asarray(tokens))).sum())
            report(f"glm_ar_{name}_{height}x{width}", tokens=len(tokens), mean_abs_logprob_err=float(diff.mean()),
                   max_abs_logprob_err=float(diff.max()), decisive_positions=int(decisive.sum()),
                   greedy_disagreements=disagreements, reference_argmax_agreement=float((ref_argmax == np.asarray(tokens)).mean()))
            if not (diff.mean() <= variant["mean"] and diff.max() <= variant["max"] and disagreements == 0):
                failures.append((height, width, float(diff.mean()), float(diff.max()), disagreements))
        assert not failures, failures
    finally:
        del model
        torch.cuda.empty_cache()
