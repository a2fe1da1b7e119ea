"""BAGEL-7B-MoT dimensions on the CUDA build of vLLM: the AR stage as deployed (understanding),
checked against the plain-PyTorch reference on the same (random, seeded) weights.

Tolerances (bf16 vLLM vs float32 references on bf16-exact weights):
  logprobs        mean |diff| <= LOGPROB_MEAN_TOL over every compared row, max <= LOGPROB_MAX_TOL;
                  greedy tokens equal wherever the reference's top-2 margin exceeds GREEDY_MARGIN
                  (closer calls are decided by bf16 rounding, not by the model)
The measured figures are printed and recorded (conftest.report) for docs/benchmarks.md.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from .conftest import picture, report

pytestmark = pytest.mark.gpu

LOGPROB_MEAN_TOL = 0.08
LOGPROB_MAX_TOL = 0.6
GREEDY_MARGIN = 0.5
N_TOKENS = 8
# Text before the image: the probe of bidirectionality looks at the image block's first row.
IMG2TEXT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
            "<|im_start|>assistant\n")
TEXT2TEXT = "<|im_start|>user\nWrite a short poem about a red cat on a blue chair.<|im_end|>\n<|im_start|>assistant\n"


def run(omni, coro):
    return omni._background.run(coro)


def vit_size(path) -> int:
    import json

    return json.loads((path / "config.json").read_text())["vit_config"]["image_size"]


def greedy_params(prompt_logprobs: bool = True):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=0,
                          prompt_logprobs=0 if prompt_logprobs else None)


def sequence_logprobs(out) -> tuple[list[int], np.ndarray]:
    """(token ids, logprob of token i given < i for i = 1 ...) over prompt + generated tokens, from vLLM."""
    ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
    lps = [d[t].logprob for t, d in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
    lps += [d[t].logprob for t, d in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)]
    return ids, np.asarray(lps)


# --------------------------------------------------------------------------- the worker


def worker_facts(worker) -> dict:
    """Runs inside the engine's worker process."""
    from vllm_omni_plugin.doctor import collect

    config = worker.vllm_config
    attention = config.compilation_config.static_forward_context
    return {
        "pid": os.getpid(),
        "patches": {p["name"]: p["status"] for p in collect().patches},
        "model_class": type(worker.model_runner.get_model()).__name__,
        "backends": sorted({layer.attn_backend.get_name() for layer in attention.values()
                            if hasattr(layer, "attn_backend")}),
        "compilation_mode": str(config.compilation_config.mode),
        "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
        "enforce_eager": config.model_config.enforce_eager,
        "dtype": str(config.model_config.dtype),
        "is_mm_prefix_lm": config.model_config.is_mm_prefix_lm,
    }


def test_plugin_patches_and_vllm_defaults_inside_the_gpu_worker(bagel_gpu_omni):
    (facts,) = run(bagel_gpu_omni, bagel_gpu_omni._stages.llm.collective_rpc(worker_facts))
    report("gpu_worker", **facts)
    assert facts["pid"] != os.getpid()
    assert facts["model_class"] == "OmniBagelForConditionalGeneration"
    assert facts["patches"]["is_mm_prefix_lm"] == "applied"
    # The CPU-attention fixes have nothing to do on CUDA and must not touch it.
    assert {facts["patches"][p] for p in facts["patches"] if p.startswith("cpu_")} == {"not applicable"}
    assert facts["is_mm_prefix_lm"] is True
    assert facts["enforce_eager"] is False and "NONE" not in facts["cudagraph_mode"].upper()
    assert facts["dtype"] == "torch.bfloat16"


# --------------------------------------------------------------------------- understanding


@pytest.fixture(scope="module")
def understanding(full_bagel):
    from reference.bagel_understanding import BagelUnderstanding

    ref = BagelUnderstanding(full_bagel, device="cuda", dtype=torch.float32)
    yield ref
    del ref
    torch.cuda.empty_cache()


def _reference_logprobs(ref, ids: list[int], images: list, layout: str = "bagel",
                        causal: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logprob of token i given < i, argmax token, top-2 margin) at each row, from the reference."""
    from reference.bagel_understanding import Sequence

    seq = ref.sequence(ids, layout)
    if causal:  # BAGEL's positions, no bidirectional span
        seq = Sequence(seq.token_ids, seq.positions, [], seq.image_runs)
    logp = ref.logits(seq, [ref.image_embeds(im) for im in images]).float().log_softmax(-1)
    target = torch.tensor(ids[1:], device=logp.device)[:, None]
    chosen = logp[:-1].gather(1, target)[:, 0]
    top2 = logp[:-1].topk(2, dim=-1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    return chosen.cpu().numpy(), top2.indices[:, 0].cpu().numpy(), margin.cpu().numpy()


def _compare_greedy(name: str, ids: list[int], ours_lp: np.ndarray, ref: tuple, prompt_len: int) -> None:
    ref_lp, ref_argmax, margin = ref
    compared = np.abs(ours_lp - ref_lp)
    # Greedy agreement: at each generated position the reference's argmax is our token where it is decisive.
    gen_rows = range(prompt_len - 1, len(ids) - 1)
    disagreements = [i for i in gen_rows if margin[i] > GREEDY_MARGIN and ref_argmax[i] != ids[i + 1]]
    report(name, mean_abs_logprob_err=float(compared.mean()), max_abs_logprob_err=float(compared.max()),
           rows=int(compared.size), decisive_greedy_positions=sum(margin[i] > GREEDY_MARGIN for i in gen_rows),
           greedy_disagreements=len(disagreements))
    assert compared.mean() <= LOGPROB_MEAN_TOL and compared.max() <= LOGPROB_MAX_TOL, (compared.mean(), compared.max())
    assert not disagreements


def test_text2text_matches_the_reference(bagel_gpu_omni, understanding):
    (out,) = bagel_gpu_omni.generate_text([{"prompt": TEXT2TEXT}], greedy_params())
    ids, ours = sequence_logprobs(out)
    _compare_greedy("text2text", ids, ours, _reference_logprobs(understanding, ids, []), len(out.prompt_token_ids))


def test_image_rows_attend_bidirectionally_and_img2text_matches_the_reference(bagel_gpu_omni, understanding, full_bagel):
    size = vit_size(full_bagel)  # the ViT's own input size: no resize policy involved
    images = [picture(1, size), picture(2, size)]
    outs = [bagel_gpu_omni.generate_text([{"prompt": IMG2TEXT, "multi_modal_data": {"image": im}}], greedy_params())[0]
            for im in images]
    tok = understanding.tok
    start = outs[0].prompt_token_ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))
    (ids_a, lp_a), (ids_b, lp_b) = (sequence_logprobs(o) for o in outs)
    # Row r's hidden state gives the logprob of token r + 1 (index r in lp). The row before the
    # block sees only text: equal for both images. The block's first row (<|vision_start|>) sees
    # the text before it and, only if the block is bidirectional, the image after it.
    before, first = lp_a[start - 1] - lp_b[start - 1], lp_a[start] - lp_b[start]
    report("bidirectional_probe", text_row_diff=float(abs(before)), first_image_row_diff=float(abs(first)))
    assert abs(before) == 0.0
    assert abs(first) > 1e-2, "the image block's first row does not see the image: attention is causal"

    ref_bi = _reference_logprobs(understanding, ids_a, images[:1])
    ref_causal = _reference_logprobs(understanding, ids_a, images[:1], causal=True)[0]
    end = ids_a.index(tok.convert_tokens_to_ids("<|vision_end|>"))
    image_rows = slice(start, end)
    err_bi = np.abs(lp_a - ref_bi[0])[image_rows].mean()
    err_causal = np.abs(lp_a - ref_causal)[image_rows].mean()
    report("image_rows_vs_reference", mean_err_bidirectional=float(err_bi), mean_err_causal=float(err_causal),
           image_rows=end - start)
    assert err_bi * 5 < err_causal, (err_bi, err_causal)
    _compare_greedy("img2text", ids_a, lp_a, ref_bi, len(outs[0].prompt_token_ids))
