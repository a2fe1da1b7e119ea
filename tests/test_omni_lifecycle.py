"""A new user's offline BAGEL script: no flags, no environment, no explicit shutdown.

Runs in a fresh interpreter, as a user's script does, with the shipped stage config
and VLLM_CPU_KVCACHE_SPACE unset: the AR stage sizes its KV cache from free memory
(orchestrator/ar_memory.py). `with Omni(...)` stops the engine processes at the end
of the block; an `Omni` left open is shut down when the main thread ends, and the
script exits without EngineDeadError / TypeError noise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

SCRIPT = textwrap.dedent('''
    import sys
    import psutil
    from vllm_omni_plugin import Omni
    from vllm_omni_plugin.diffusion import SamplingParams

    PROMPT = "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n"

    def engine_processes():
        alive = []
        for p in psutil.Process().children(recursive=True):
            try:  # an exited child not yet reaped (a zombie) runs nothing
                if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    if __name__ == "__main__":
        with Omni(sys.argv[1]) as omni:
            (text,) = omni.generate_text(PROMPT)
            assert engine_processes(), "the AR stage runs in engine processes"
        print("WITH_TOKENS", len(text.outputs[0].token_ids), flush=True)
        print("AFTER_WITH_PROCESSES", len(engine_processes()), flush=True)
        try:
            omni.generate("x")
        except RuntimeError as e:
            print("CLOSED", e, flush=True)

        left_open = Omni(sys.argv[1])  # never shut down by the script
        (image,) = left_open.generate("a red cat", SamplingParams(seed=0, height=64, width=64, num_inference_steps=2))
        print("IMAGE", image.images[0].size, flush=True)
''')


def test_bagel_starts_without_flags_and_exits_cleanly(checkpoint, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    done = subprocess.run([sys.executable, str(script), str(checkpoint("bagel"))], capture_output=True, text=True,
                          env=env, timeout=900)
    out, err = done.stdout, done.stderr
    logs = out + err  # vLLM logs to stdout
    assert done.returncode == 0, out + err[-4000:]
    assert "WITH_TOKENS" in out and "AFTER_WITH_PROCESSES 0" in out, out
    assert "CLOSED" in out and "was shut down" in out
    assert "IMAGE (64, 64)" in out
    # vLLM's worker: the cache size it got is explicit -- ours, from free memory; no flag or env var was given
    assert "GiB for KV cache" in logs and "Explicitly set" in logs
    for noise in ("Traceback", "EngineDeadError", "TypeError", "cannot schedule new futures"):
        assert noise not in logs, logs[-4000:]
