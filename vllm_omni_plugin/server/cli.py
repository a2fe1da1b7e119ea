"""Command line: `vllm serve MODEL --omni [vLLM serve flags] [omni flags]`.

vLLM 0.32's CLI hands any argv containing `--omni` to
`vllm_omni.entrypoints.cli.main:main` (our shim package, see
docs/server.md); `vllm-omni serve MODEL ...` reaches the same `serve_main`
without going through that hook. The parser is vLLM's own serve parser
(`make_arg_parser`), so --host, --port, --api-key, --served-model-name,
--allowed-local-media-path, --config ... keep their meaning; the omni flags
form one more group ("Omni", see `vllm serve --omni --help=Omni`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_omni_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
                       "are dealt out too). Overrides the stage config's dit_options; world size = cfg x ulysses x "
                       "ring, one GPU per rank.")
    group.add_argument("--omni-ulysses-degree", type=int, default=None, help="DiT Ulysses sequence-parallel degree.")
    group.add_argument("--omni-ring-degree", type=int, default=None, help="DiT ring-attention sequence-parallel degree.")
    group.add_argument("--omni-dit-quantization", choices=["fp8"], default=None,
                       help="fp8: torchao float8 DiT linear layers (CUDA, compute capability >= 8.9).")
    # choices = acceleration.COMPILE_MODES, not imported: this module stays free of torch
    group.add_argument("--omni-dit-compile", choices=["regional"], default=None,
                       help="regional: torch.compile the DiT's repeated blocks.")
    return parser


def make_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="vllm serve",
        usage="vllm serve [model_tag] --omni [options]",
        description="OpenAI-compatible server with image, edit, video and chat-image routes (vllm-omni-plugin).",
    )
    parser = make_arg_parser(parser)
    return add_omni_args(parser)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args

    args = make_parser().parse_args(list(argv))
    args.subparser = "serve"  # what vLLM's own CLI sets; its validators key on it
    if args.model_tag is not None:
        args.model = args.model_tag
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    args.omni = True
    return args


def serve_main(argv: Sequence[str]) -> int:
    """`vllm-omni serve ...` and `vllm serve ... --omni` end here."""
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from .launch import run_server

    cli_env_setup()
    args = parse_args(argv)
    # A bad flag, a model that is not there, a stage default the model does not read: the
    # caller (cli_errors.run_command) prints one line and exits 1; --debug shows the traceback.
    uvloop.run(run_server(args))
    return 0


def main_from_vllm(argv: Sequence[str] | None = None) -> int:
    """What vLLM's `maybe_run_omni` calls: argv is the whole `vllm ...` command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = [a for a in argv if a != "--omni"]
    if not rest or rest[0] != "serve":
        print(
            "vllm-omni-plugin: --omni is a flag of `vllm serve` (e.g. `vllm serve MODEL --omni`); "
            f"got `vllm {' '.join(argv)}`",
            file=sys.stderr,
        )
        return 2
    return serve_main(rest[1:])
