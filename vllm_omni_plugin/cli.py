"""`vllm-omni`: the plugin's own command line.

  vllm-omni doctor [--json] [--no-probe] [--contracts]   is the environment sound, is the plugin loaded, what is patched
  vllm-omni make-checkpoint FAMILY --preset tiny|full --out DIR [--seed N] [--device cuda]
  vllm-omni serve MODEL [vllm serve flags] [omni flags]   same as `vllm serve MODEL --omni`
  vllm-omni bench [--task images|edits|chat|videos] [load flags]  load a running server (docs/bench.md)

Any command also takes `--debug`: a failure then shows its traceback instead of
one error line (cli_errors.py).
"""

from __future__ import annotations

import argparse
import json
import sys


def _doctor(args: argparse.Namespace) -> int:
    # The environment first, without importing torch or vLLM: a mismatched
    # torchvision makes those imports crash, and the point is to say why.
    from vllm_omni_plugin.environment import as_dicts, diagnose

    findings = diagnose(probe=not args.no_probe)
    if any(f.blocks_import for f in findings if not f.ok):
        if args.json:
            print(json.dumps({"environment": as_dicts(findings), "ok": False}, indent=2))
        else:
            print("environment:\n" + "\n".join(f.as_text() for f in findings))
            print("status: PROBLEMS -- vLLM cannot be loaded here; apply the fixes above, then run `vllm-omni doctor` again")
        return 1
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
    report = collect(contracts=args.contracts)
    if load_error:
        for p in report.patches:
            if p["status"] != "applied" and p["name"] in load_error:
                p["status"], p["detail"] = "failed", load_error
    ok = report.ok and all(f.ok for f in findings)
    if args.json:
        print(json.dumps({"environment": as_dicts(findings), **report.__dict__, "ok": ok}, indent=2))
    else:
        print("environment:\n" + "\n".join(f.as_text() for f in findings))
        print(report.as_text())
    return 0 if ok else 1


def _make_checkpoint(args: argparse.Namespace) -> int:
    from vllm_omni_plugin.checkpoints import make_checkpoint

    path = make_checkpoint(args.family, args.preset, args.out, seed=args.seed, device=args.device)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`vllm-omni ...`: failures are one line on stderr (`--debug` for the traceback)."""
    from vllm_omni_plugin.cli_errors import run_command

    return run_command(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        # vLLM's serve parser (with its --help) takes every flag after `serve`.
        from vllm_omni_plugin.server.cli import serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    """The `vllm-omni` parser (`serve` is only listed: vLLM's serve parser takes its flags)."""
    from vllm_omni_plugin.checkpoints import PRESETS, checkpoint_names, device_checkpoint_names

    parser = argparse.ArgumentParser(prog="vllm-omni", description="vllm-omni-plugin tools")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser(
        "doctor", help="check the environment (torch / vLLM / torchvision builds, the vllm_omni shim), then show "
        "vLLM version, platform, patches and registered architectures")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--contracts", action="store_true",
                        help="also check what the plugin relies on in the installed vLLM (patch signatures, vLLM "
                        "imports, model classes, KV-connector methods, plugin hooks; vllm_omni_plugin/contracts.py)")
    doctor.add_argument("--no-probe", action="store_true",
                        help="skip trying torch/torchvision/transformers/vllm imports in a child process")
    doctor.set_defaults(func=_doctor)

    make = sub.add_parser("make-checkpoint", help="write a seeded random checkpoint in a family's real format")
    make.add_argument("family", choices=checkpoint_names())
    make.add_argument("--preset", choices=PRESETS, default="tiny")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--device", default="cpu",
                      help="where the random weights are drawn: cpu, or cuda for "
                      f"{', '.join(device_checkpoint_names())} (fast full builds)")
    make.set_defaults(func=_make_checkpoint)

    from vllm_omni_plugin.bench.cli import add_bench_args

    add_bench_args(sub.add_parser(
        "bench", help="load generator for a running omni server: throughput, latency percentiles, errors "
        "by code (docs/bench.md)"))

    sub.add_parser(
        "serve",
        add_help=False,
        help="OpenAI-compatible image/video server: `vllm serve MODEL --omni` without vLLM's --omni hook "
        "(`vllm-omni serve --help` lists the flags)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
