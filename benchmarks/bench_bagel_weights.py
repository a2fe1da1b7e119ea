"""Resident weight bytes per stage of multi-stage BAGEL at full dims (BAGEL-7B-MoT), on meta tensors.

No weights are drawn or read: every tensor of the `full` checkpoint's ema.safetensors and
ae.safetensors (families/bagel/checkpoint.py, the real names and shapes) is made on the meta
device in the dtype it is held in on a GPU (bfloat16), and each stage's loader rule picks
the tensors it keeps:

    AR stage   vLLM's Bagel (vllm/model_executor/models/bagel.py `load_weights`, vLLM 0.32:
               drops moe_gen / latent_pos_embed / llm2vae / vae2llm / time_embedder and the
               FLUX encoder/decoder) + OmniBagel's generation side (vllm_gen.is_generation_weight:
               the generation expert, vae2llm, time embedder, latent positions, FLUX encoder)
    DiT before load_bagel_model(dit_only=False): both files whole
    DiT after  load_bagel_model(dit_only=True): dit_forward_weight + the two marker rows

    .venv/bin/python benchmarks/bench_bagel_weights.py [--preset full]
"""

from __future__ import annotations

import argparse


def vllm_bagel_keeps(file: str, name: str) -> bool:
    """vLLM 0.32's Bagel.load_weights filter (the names it passes on to its modules)."""
    generation_keywords = ("moe_gen", "latent_pos_embed", "llm2vae", "vae2llm", "time_embedder")
    return not any(k in name for k in generation_keywords) and not name.startswith(("decoder.", "encoder."))


def _part(file: str, name: str) -> str:
    """A readable group for a tensor name: the FLUX encoder, the embedding table, the LM head, the ViT ..."""
    if file == "ae.safetensors":
        return "FLUX " + name.split(".")[0]
    parts = name.split(".")
    return ".".join(parts[:3] if parts[:2] == ["language_model", "model"] else parts[:2] if parts[0] == "language_model"
                    else parts[:1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="full", choices=("tiny", "full"))
    args = ap.parse_args()

    import torch

    from vllm_omni_plugin.families.bagel.checkpoint import PRESETS, ae_spec, ema_spec
    from vllm_omni_plugin.families.bagel.dit.weights import EMBED_TABLE, MARKERS, dit_forward_weight
    from vllm_omni_plugin.families.bagel.vllm_gen import is_generation_weight

    dims = PRESETS[args.preset]
    files = {"ema.safetensors": ema_spec(dims), "ae.safetensors": ae_spec(dims)}
    tensors = {(f, n): torch.empty(shape, dtype=torch.bfloat16, device="meta")
               for f, spec in files.items() for n, (shape, _kind) in spec.items()}

    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    embed_row = size(tensors[("ema.safetensors", EMBED_TABLE)][0])
    ar = {k for k in tensors if (k[0] == "ema.safetensors" and vllm_bagel_keeps(*k)) or is_generation_weight(k[1])}
    dit = {k for k in tensors if dit_forward_weight(*k)}
    stages = {
        "AR stage (vLLM engine process)": sum(size(tensors[k]) for k in ar),
        "DiT stage, before (whole checkpoint)": sum(size(t) for t in tensors.values()),
        "DiT stage, after (its forward's weights)": sum(size(tensors[k]) for k in dit) + len(MARKERS) * embed_row,
        "held by both stages after (the MoT layers the DiT forward runs)": sum(size(tensors[k]) for k in ar & dit),
    }
    dropped: dict[str, int] = {}
    for key, t in tensors.items():
        if key not in dit:
            dropped[_part(*key)] = dropped.get(_part(*key), 0) + size(t)
    print(f"BAGEL {args.preset} dims, bfloat16, resident weight bytes per stage")
    print("| stage | GiB |")
    print("|---|---|")
    for name, nbytes in stages.items():
        print(f"| {name} | {nbytes / 2**30:.2f} |")
    print("\nno longer loaded by the DiT stage:")
    print("| part | GiB |")
    print("|---|---|")
    for part, nbytes in sorted(dropped.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {nbytes / 2**30:.3f} |")
    print(f"(the embedding table's {len(MARKERS)} marker rows stay: {len(MARKERS) * embed_row} bytes)")


if __name__ == "__main__":
    main()
