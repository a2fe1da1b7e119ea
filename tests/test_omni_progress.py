"""`Omni.generate`'s progress bar (tqdm, on by default like `LLM.generate`): requests and their steps
on stderr; `use_tqdm=False` prints nothing; the caller's `on_event` sees every event either way and
the images do not depend on the bar."""

from __future__ import annotations

import pytest

from vllm_omni_plugin.diffusion.params import SamplingParams
from vllm_omni_plugin.omni import Omni


@pytest.fixture(scope="module")
def omni(checkpoint):
    return Omni(str(checkpoint("qwen-image")))


def test_progress_bar_over_requests_and_steps(omni, capsys):
    params = SamplingParams(seed=3, num_inference_steps=3, width=32, height=32)
    seen = []
    with_bar = omni.generate(["a cat", "a dog"], params, on_event=seen.append)
    err = capsys.readouterr().err
    assert "Generating" in err and "2/2" in err
    assert "steps 6/6" in err  # two requests of three steps each, all done
    kinds = [e.kind for e in seen]
    assert kinds.count("step") == 6 and kinds.count("finished") == 2

    seen.clear()
    quiet = omni.generate(["a cat", "a dog"], params, on_event=seen.append, use_tqdm=False)
    assert capsys.readouterr().err == ""
    assert [e.kind for e in seen].count("step") == 6
    assert [o.images[0].tobytes() for o in quiet] == [o.images[0].tobytes() for o in with_bar]
