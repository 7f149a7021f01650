"""``--model org/name``: a Hugging Face repository id, resolved as ``mlx_lm.load`` resolves it.

A path that exists is used as it is. Otherwise a name of the form ``org/name`` is looked up in the
local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``;
the snapshot ``refs/main`` names) and, when it is not there, downloaded with ``huggingface_hub``
(the files ``mlx_lm.load`` fetches), which works only where the network allows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flashmoe.errors import CheckpointError

# what mlx_lm.load downloads for a repository id
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
                  "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "huggingface")
    return Path(home) / "hub"


def resolve_model(name: str | os.PathLike) -> Path:
    """The local directory of ``name``: the path itself, or a repository's cached snapshot."""
    path = Path(name)
    if path.exists() or not _REPO_ID.match(str(name)) or ".." in str(name):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(str(name), cache_dir=cache, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(str(name), cache_dir=cache, allow_patterns=ALLOW_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{name} is neither a directory nor a Hugging Face repository in {cache} "
            f"(download failed: {first})"
        ) from None
