"""The prompts a benchmark sends: a built-in set, or a file.

The built-in set is short, varied text-to-image prompts (objects, scenes, styles) so that
prompt-length effects stay small and runs are comparable between machines. A run of N
requests cycles through the set in order: request i gets prompt i mod len(set).
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_PROMPTS: tuple[str, ...] = (
    "a red fox sitting in fresh snow, morning light",
    "a lighthouse on a rocky coast during a storm, oil painting",
    "a bowl of ramen with a soft-boiled egg, top-down photo",
    "an astronaut riding a bicycle on the moon, watercolor",
    "a cozy reading nook with a window seat and rain outside",
    "a futuristic city skyline at dusk with flying trains",
    "a close-up of a hummingbird drinking from a purple flower",
    "a wooden sailboat on a calm lake surrounded by mountains",
    "a steaming cup of coffee on a desk next to a laptop, film photo",
    "a medieval castle on a hill under a starry sky",
    "a golden retriever puppy playing with a ball in a garden",
    "a neon-lit street market at night in the rain",
    "a minimalist poster of a mountain range, flat colors",
    "a glass terrarium with moss and tiny mushrooms",
    "an old steam locomotive crossing a stone bridge",
    "a field of sunflowers under a blue sky with white clouds",
)


class PromptFileError(ValueError):
    """A prompt file that cannot be read as prompts (the message names the file and line)."""


def load_prompts(path: str | Path | None) -> list[str]:
    """The prompt set: the built-in one, or the prompts of a file.

    Args:
        path: None for the built-in set; a `.jsonl` file (one JSON object with a "prompt"
            string per line) or any other text file (one prompt per non-empty line).

    Returns:
        the prompts, in file order (at least one).

    Raises:
        PromptFileError: the file has no prompts, or a JSONL line is not {"prompt": str}.
    """
    if path is None:
        return list(BUILTIN_PROMPTS)
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise PromptFileError(f'{path}:{number}: expected {{"prompt": "..."}}')
            prompts.append(item["prompt"])
        else:
            prompts.append(line.strip())
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts
