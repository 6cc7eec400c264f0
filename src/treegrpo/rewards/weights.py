"""Where reward-model weights come from, and the one error a user sees when they are missing.

Resolution order for every pretrained reward:

1. an explicit local path from the config (``reward.options: {NAME: {KEY: /path}}``), or
2. the local Hugging Face cache (``local_files_only=True``), or
3. a download from the Hugging Face hub, **only** when ``HF_HUB_OFFLINE`` is unset or false
   (the ``treegrpo`` command sets ``HF_HUB_OFFLINE=1`` unless the user set it, so a run never
   fetches anything silently; run with ``HF_HUB_OFFLINE=0`` to let it download).

When none works the loader raises `RewardWeightsError` (a `ConfigError`, so the CLI prints it as
one line) naming the repository and file to download, the command that does it, and the config key
that points at a local copy instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from treegrpo.config import ConfigError

T = TypeVar("T")


class RewardWeightsError(ConfigError):
    """The weights a reward model needs are not available locally (and downloading is off)."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access (any of 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def missing_weights(reward: str, what: str, repo_id: str, files: str, option: str, cause: Exception | None) -> RewardWeightsError:
    download = f"hf download {repo_id}{' ' + files if files else ''}"
    why = f" ({type(cause).__name__})" if cause is not None else ""
    how = ("downloads are off because HF_HUB_OFFLINE=1; fetch it once with "
           f"`{download}` (or rerun with HF_HUB_OFFLINE=0)") if hub_offline() else f"fetch it with `{download}`"
    return RewardWeightsError(
        f"reward {reward!r} needs {what} from the Hugging Face repo {repo_id!r}{' (' + files + ')' if files else ''}, "
        f"which is not in the local cache{why}: {how}, or point reward.options.{reward}.{option} at a local copy")


def resolve_file(reward: str, repo_id: str, filename: str, path: str | None, option: str) -> str:
    """A local file for `reward`: `path` if given (it must exist), else `repo_id/filename` from the
    Hugging Face cache (downloaded only when not offline). Raises RewardWeightsError."""
    if path:
        if not Path(path).expanduser().is_file():
            raise RewardWeightsError(f"reward {reward!r}: reward.options.{reward}.{option} = {path!r} is not a file")
        return str(Path(path).expanduser())
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, local_files_only=hub_offline())
    except Exception as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, HTTP errors, ...
        raise missing_weights(reward, f"the file {filename!r}", repo_id, filename, option, err) from None


def load_pretrained(reward: str, loader: Callable[..., T], source: str | None, repo_id: str, option: str,
                    what: str = "a model folder", files: str = "") -> T:
    """``loader(source or repo_id, local_files_only=offline)`` (a transformers ``from_pretrained``),
    turning "not found" into RewardWeightsError. A local folder `source` must exist."""
    if source and (source.startswith((".", "/", "~")) or Path(source).expanduser().exists()):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise RewardWeightsError(f"reward {reward!r}: reward.options.{reward}.{option} = {source!r} is not a folder")
        source = str(folder)
    name = source or repo_id
    try:
        return loader(name, local_files_only=hub_offline())
    except (OSError, ValueError) as err:  # transformers raises OSError for missing files / repos
        if source and Path(source).is_dir():
            raise RewardWeightsError(f"reward {reward!r}: cannot load {what} from {source!r}: {err}") from None
        raise missing_weights(reward, what, name, files, option, err) from None


def load_all(*loaders: Callable[[], object]) -> list:
    """Run every loader; if some raise RewardWeightsError, raise one error listing all that is missing
    (so a user downloads everything in one go instead of discovering one file per run)."""
    results, problems = [], []
    for load in loaders:
        try:
            results.append(load())
        except RewardWeightsError as err:
            problems.append(str(err))
            results.append(None)
    if problems:
        raise RewardWeightsError(" AND ".join(problems) if len(problems) > 1 else problems[0])
    return results


def check_tokenizer(reward: str, tokenizer: T, source: str | None, repo_id: str, files: str, option: str) -> T:
    """transformers 5 builds an empty tokenizer (no vocabulary) instead of failing when its files are
    missing; turn that into RewardWeightsError."""
    if len(tokenizer.get_vocab()) >= 10:  # type: ignore[attr-defined]
        return tokenizer
    if source and Path(source).expanduser().is_dir():
        raise RewardWeightsError(f"reward {reward!r}: the folder {source!r} (reward.options.{reward}.{option}) has no "
                                 f"tokenizer files; it needs {files}")
    raise missing_weights(reward, "a tokenizer", source or repo_id, files, option, None)
