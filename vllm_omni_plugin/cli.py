"""`vllm-omni`: the plugin's own command line.

  vllm-omni doctor [--json]                       is the plugin loaded, what is patched
  vllm-omni make-checkpoint FAMILY --preset tiny|full --out DIR [--seed N] [--device cuda]
  vllm-omni serve MODEL [vllm serve flags] [omni flags]   same as `vllm serve MODEL --omni`
"""

from __future__ import annotations

import argparse
import json
import sys


def _doctor(args: argparse.Namespace) -> int:
    # Load plugins exactly the way every vLLM process does, so this also
    # proves the entry point is discoverable (and honours VLLM_PLUGINS).
    from vllm.plugins import load_general_plugins

    from vllm_omni_plugin.doctor import collect
    from vllm_omni_plugin.patches import PatchError

    load_error = None
    try:
        load_general_plugins()
    except PatchError as e:
        load_error = str(e)
    report = collect()
    if load_error:
        for p in report.patches:
            if p["status"] != "applied" and p["name"] in load_error:
                p["status"], p["detail"] = "failed", load_error
    if args.json:
        print(json.dumps({**report.__dict__, "ok": report.ok}, indent=2))
    else:
        print(report.as_text())
    return 0 if report.ok else 1


def _make_checkpoint(args: argparse.Namespace) -> int:
    from vllm_omni_plugin.checkpoints import make_checkpoint

    path = make_checkpoint(args.family, args.preset, args.out, seed=args.seed, device=args.device)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from vllm_omni_plugin.checkpoints import FAMILIES, PRESETS

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        # vLLM's serve parser (with its --help) takes every flag after `serve`.
        from vllm_omni_plugin.server.cli import serve_main

        return serve_main(argv[1:])

    parser = argparse.ArgumentParser(prog="vllm-omni", description="vllm-omni-plugin tools")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="show vLLM version, platform, patches and registered architectures")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=_doctor)

    make = sub.add_parser("make-checkpoint", help="write a seeded random checkpoint in a family's real format")
    make.add_argument("family", choices=sorted(FAMILIES))
    make.add_argument("--preset", choices=PRESETS, default="tiny")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--device", default="cpu",
                      help="where the random weights are drawn: cpu, or cuda for bagel / qwen-image* (fast full builds)")
    make.set_defaults(func=_make_checkpoint)

    sub.add_parser(
        "serve",
        add_help=False,
        help="OpenAI-compatible image/video server: `vllm serve MODEL --omni` without vLLM's --omni hook "
        "(`vllm-omni serve --help` lists the flags)",
    )

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
