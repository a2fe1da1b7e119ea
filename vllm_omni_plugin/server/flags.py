"""The omni flags: vLLM's own serve parser plus the "Omni" argument group.

The parser is vLLM's (`make_arg_parser`), so --host, --port, --api-key,
--served-model-name, --allowed-local-media-path, --config ... keep their
meaning; the omni flags form one more group ("Omni", see
`vllm serve --omni --help=Omni`). A leaf of server/: it imports nothing of
this package, so every other module (config, plugin, the entry point) can
import it at the top.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from vllm.logger import configure_logging_from_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

from ..vllm_moves import vllm_symbol

# both moved to vllm.entrypoints.common.cli_args in vLLM 0.33 (vllm_moves.py)
make_arg_parser = vllm_symbol("make_arg_parser")
validate_parsed_serve_args = vllm_symbol("validate_parsed_serve_args")


def add_omni_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "Omni" argument group to `parser`; returns `parser`."""
    group = parser.add_argument_group(
        "Omni", "Image / video / multi-stage generation (vllm-omni-plugin). Limits apply to resolved values."
    )
    group.add_argument("--omni", action="store_true", help="Serve with the omni routes (set by `vllm serve --omni`).")
    group.add_argument(
        "--stage-configs-path",
        default=None,
        help="Stage-config YAML (schema: vllm_omni_plugin/orchestrator/stage_config.py). Diffusion checkpoints: "
        "its final stage's `default_sampling_params` are the stage defaults (request > stage defaults > the "
        "pipeline's own). Multi-stage checkpoints: replaces the shipped config; vLLM engine flags given on the "
        "command line override its AR stage's `engine_args`.",
    )
    group.add_argument(
        "--default-sampling-params",
        default=None,
        help='JSON object of stage defaults for the diffusion stage, e.g. \'{"num_inference_steps": 30}\'; '
        "overrides --stage-configs-path.",
    )
    group.add_argument("--omni-max-pixels", type=int, default=2048 * 2048, help="Max output width*height.")
    group.add_argument("--omni-max-frames", type=int, default=241, help="Max output video frames.")
    group.add_argument("--omni-max-n", type=int, default=8, help="Max outputs per request (n).")
    group.add_argument("--omni-max-steps", type=int, default=200, help="Max num_inference_steps.")
    group.add_argument(
        "--omni-max-input-pixels", type=int, default=8192 * 8192, help="Max width*height of an input image."
    )
    group.add_argument(
        "--omni-max-queue",
        type=int,
        default=64,
        help="Max requests in the diffusion engine at once (waiting + running); more get HTTP 503.",
    )
    group.add_argument(
        "--omni-max-batch-tokens", type=int, default=65536, help="Token budget of one batched denoise step."
    )
    group.add_argument(
        "--omni-video-dir",
        default=None,
        help="Scratch directory where videos are encoded before they go into the job store "
        "(default: a fresh temporary directory, removed at exit).",
    )
    group.add_argument(
        "--omni-job-store",
        default=None,
        help="Where video jobs and their files live: sqlite:///PATH (one server; kept across restarts) or "
        "postgresql://USER@HOST:PORT/DB (shared by replicas behind a router). Default: a temporary SQLite "
        "file, removed at exit.",
    )
    group.add_argument(
        "--omni-video-retention",
        type=float,
        default=3600.0,
        help="Seconds a finished video is kept before it is deleted (DELETE /v1/videos/{id} removes it at once).",
    )
    group.add_argument("--omni-cfg-parallel-size", type=int, default=None,
                       help="DiT CFG / batch split degree (2: cond and uncond on two GPUs; more: concurrent requests "
                       "are dealt out too; BAGEL: 2 or 3, its cond / cfg_text / cfg_img branches on different "
                       "ranks, docs/bagel.md). Overrides the stage config's dit_options; world size = cfg x ulysses x "
                       "ring, one GPU per rank.")
    group.add_argument("--omni-ulysses-degree", type=int, default=None, help="DiT Ulysses sequence-parallel degree.")
    group.add_argument("--omni-ring-degree", type=int, default=None, help="DiT ring-attention sequence-parallel degree.")
    group.add_argument("--omni-dit-quantization", choices=["fp8", "fp8_static"], default=None,
                       help="fp8: torchao float8 DiT linear layers, activations scaled per row at run time (CUDA, "
                       "compute capability >= 8.9). fp8_static: one activation scale per layer, calibrated while "
                       "the server loads on a fixed seeded request (same GPUs; also runs on CPU); docs/diffusion.md.")
    group.add_argument("--omni-stage", choices=["ar", "dit"], default=None,
                       help="Multi-stage models on separate hosts (docs/server.md): `ar` serves the AR stage alone "
                       "(vLLM's OpenAI server; its KV connector publishes each image request's prompt KV over NIXL "
                       "and returns the handle in kv_transfer_params; a token hand-over, GLM-Image's, is answered on vLLM's "
                       "/inference/v1/generate); `dit` serves the image routes and pulls the KV (or the tokens) from "
                       "the AR servers of --omni-ar-url. Default: both stages in this server.")
    group.add_argument("--omni-ar-url", default=None,
                       help="--omni-stage dit: the AR servers, comma-separated (http://HOST:PORT,...); each request "
                       "goes to the least loaded (vLLM's /load) that answers.")
    group.add_argument("--omni-kv-lease", type=float, default=60.0,
                       help="--omni-stage ar: seconds a published KV context waits for its DiT server's pull before "
                       "it is freed (freed on the pull's acknowledgement otherwise).")
    group.add_argument("--omni-engine", choices=["process", "thread"], default="process",
                       help="Where the diffusion engine (a multi-stage model's DiT stage) runs: in its own process "
                       "(a crash there is a 503 for its requests and a restart) or on a thread of the server "
                       "process (benchmarks of the difference, debugging).")
    # choices = acceleration.COMPILE_MODES, not imported: this module stays free of torch
    group.add_argument("--omni-dit-compile", choices=["regional"], default=None,
                       help="regional: torch.compile the DiT's repeated blocks.")
    # choices = acceleration.ATTENTION_MODES
    group.add_argument("--omni-dit-attention-mode", choices=["auto", "padded", "per_row", "varlen"], default=None,
                       help="BAGEL's DiT: how the batched CFG rows attend to contexts of different lengths "
                       "(auto: per batch; padded: right-padded + mask; per_row: one SDPA per row; varlen: packed, "
                       "torch's varlen_attn on CUDA). docs/bagel.md, \"The DiT step\".")
    group.add_argument("--omni-dit-cuda-graphs", action="store_true", default=None,
                       help="Replay the whole DiT forward as one CUDA graph per (rows, tokens) bucket (small "
                       "requests are launch-bound); captured on a bucket's second use. CUDA GPUs, diffusers "
                       "Qwen-Image DiTs.")
    group.add_argument("--omni-dit-cuda-graph-max", type=int, default=None, metavar="N",
                       help="--omni-dit-cuda-graphs: most graphs kept at once (the least recently used one is "
                       "released). Default: 8.")
    group.add_argument(
        "--omni-lora", action="append", default=[], metavar="NAME=PATH",
        help="A LoRA adapter (diffusers-format .safetensors, as pipeline.load_lora_weights reads it) served under "
        "NAME, selected per request by `model: NAME` or `lora: [{name, scale}]`; repeatable. Its path counts as "
        "allowed.")
    group.add_argument(
        "--omni-lora-dirs", action="append", default=[], metavar="DIR",
        help="Directories adapters may be read from (POST /v1/load_lora_adapter, with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING set); repeatable. Symlinks are resolved before the check.")
    group.add_argument("--omni-max-loras", type=int, default=4,
                       help="Most LoRA adapters resident at once; the least recently used one no queued or running "
                       "request uses is evicted (it reloads from its path when named again).")
    group.add_argument("--omni-max-lora-bytes", type=int, default=2 << 30,
                       help="Largest adapter file read, in bytes.")
    return parser


def make_parser() -> argparse.ArgumentParser:
    """vLLM's own serve parser with the "Omni" group added."""
    parser = FlexibleArgumentParser(
        prog="vllm serve",
        usage="vllm serve [model_tag] --omni [options]",
        description="OpenAI-compatible server with image, edit, video and chat-image routes (vllm-omni-plugin).",
    )
    parser = make_arg_parser(parser)
    return add_omni_args(parser)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`vllm serve` argv (without `serve`) -> the parsed, validated serve args, `omni` set."""
    args = make_parser().parse_args(list(argv))
    args.subparser = "serve"  # what vLLM's own CLI sets; its validators key on it
    if args.model_tag is not None:
        args.model = args.model_tag
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    args.omni = True
    return args
