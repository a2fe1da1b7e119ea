"""Model ids -> local checkpoint directories, the way vLLM resolves them.

`vllm serve ORG/NAME --omni` and `Omni("ORG/NAME")` both call `resolve_model`:

* an existing local directory is used as it is;
* anything else is a Hugging Face repo id, resolved by `huggingface_hub.snapshot_download`
  -- the library vLLM itself uses -- so the same settings mean the same thing:
  `HF_HOME` / `HF_HUB_CACHE` (the cache), `--download-dir` / `download_dir` (a cache
  directory instead of it), `--revision` / `revision` (branch, tag or commit; default
  `main`), `HF_HUB_OFFLINE=1` (cache only, no network), `HF_TOKEN`. Where the network
  allows, a missing snapshot is downloaded; where it does not, the cached one is used.

A model that cannot be found raises ONE `ModelNotFoundError` naming what was looked
for: the id, the revision and the cache directory (and whether the hub was reachable).

This module imports neither vLLM nor torch.
"""

from __future__ import annotations

import re
from pathlib import Path

# What huggingface_hub accepts as a repo id: "name" or "org/name".
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor a resolvable hub id; the message says what was looked for."""


def hub_cache_dir(download_dir: str | Path | None = None) -> Path:
    """The cache directory a lookup uses: `download_dir` if given, else huggingface_hub's
    (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if download_dir is not None:
        return Path(download_dir).expanduser().resolve()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def resolve_model(model: str | Path, revision: str | None = None, download_dir: str | Path | None = None) -> Path:
    """The local directory holding `model`.

    Args:
        model: a local checkpoint directory, or a Hugging Face repo id ("ORG/NAME").
        revision: branch, tag or commit of a repo id (default: huggingface_hub's, "main").
            Ignored for a local directory, as vLLM ignores it there.
        download_dir: the cache directory to use instead of huggingface_hub's default.

    Returns:
        the checkpoint directory (for a repo id: its snapshot in the cache).

    Raises:
        ModelNotFoundError: not a directory, and not found in the cache nor (where
            reachable) on the hub; the message names the id, revision and cache.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    cache = hub_cache_dir(download_dir)
    where = f"model {name!r} (revision {revision or 'main'!r})"
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(f"{where}: no such local directory, and not a Hugging Face repo id (ORG/NAME)")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=offline))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError) as e:
        how = ("HF_HUB_OFFLINE=1, so only the cache was searched" if offline
               else f"the hub could not provide it either ({type(e).__name__})")
        raise ModelNotFoundError(
            f"{where} was not found: no local directory {name!r}, and no snapshot in the Hugging Face cache "
            f"{cache} (expected {cache / _cache_folder(name)}/snapshots/<commit>, with refs/{revision or 'main'} "
            f"naming the commit); {how}. Download it (`hf download {name}`), point HF_HOME or "
            "--download-dir at the cache that holds it, or pass a local directory."
        ) from e


def _cache_folder(repo_id: str) -> str:
    """huggingface_hub's folder name for a model repo: models--ORG--NAME."""
    return "models--" + repo_id.replace("/", "--")
