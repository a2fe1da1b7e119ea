"""Put a generated checkpoint into a Hugging Face cache, in the hub's own layout.

    <cache>/models--ORG--NAME/
        blobs/<sha256>                     file contents, one blob per distinct file
        snapshots/<commit>/<path>          symlinks to ../../blobs/<sha256>
        refs/<revision>                    the commit a branch / tag names

This is what `huggingface_hub` writes when it downloads a repo, so
`snapshot_download(..., local_files_only=True)` -- and therefore `vllm serve
ORG/NAME --omni` and `Omni("ORG/NAME")` with HF_HUB_OFFLINE=1 -- find it where
no hub can be reached. The commit id is derived from the contents (the same
checkpoint gives the same commit).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def install_in_hub_cache(src: str | Path, cache_dir: str | Path, repo_id: str, revision: str = "main") -> Path:
    """Copy checkpoint directory `src` into `cache_dir` as snapshot of `repo_id` at `revision`.

    Args:
        src: a checkpoint directory (e.g. from `make_checkpoint`).
        cache_dir: the hub cache (what HF_HUB_CACHE / $HF_HOME/hub / --download-dir point at).
        repo_id: "ORG/NAME".
        revision: the branch or tag whose ref names the new commit.

    Returns:
        the snapshot directory (`.../snapshots/<commit>`).
    """
    src, repo = Path(src), Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    digests = {p: _sha256(p) for p in files}
    listing = "".join(f"{p.relative_to(src).as_posix()}\0{digests[p]}\n" for p in files)
    commit = hashlib.sha1(listing.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = repo / "blobs" / digests[path]
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no trailing newline: huggingface_hub reads the file as the commit
    return snapshot


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
