"""Turn the names a user writes (fixture:NAME, a local directory, a hub id) into local paths.

Only a hub id touches the network, and only when the files are not cached already; every failure says what was
tried and how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf.errors import UserError

# Files a model directory needs; weights only as safetensors (never pickles from the network).
MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def is_fixture(name: str) -> bool:
    return name.startswith("fixture:")


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and not os.path.isabs(name)


def hub_token() -> str | None:
    """The user's hub token, read from the environment only when a download needs it; never stored or logged."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _download(repo_id: str, revision: str | None, repo_type: str, patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns, token=hub_token()
            )
        )
    except LocalEntryNotFoundError:
        raise UserError(
            f"cannot fetch {kind} '{repo_id}' from the Hugging Face hub (offline, and not in the local cache); "
            f"download it on a connected machine or pass a local directory instead"
        ) from None
    except GatedRepoError:
        raise UserError(
            f"{kind} '{repo_id}' is gated on the hub: accept its terms there and set HF_TOKEN in the environment"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"no {kind} '{repo_id}': not a local path, and not on the Hugging Face hub (check the spelling)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{kind} '{repo_id}' has no revision '{revision}'") from None
    except HFValidationError:
        raise UserError(f"'{repo_id}' is neither an existing local path nor a valid hub id") from None


def resolve_model(name: str, revision: str | None = None, what: str = "model") -> Path:
    """A local directory holding config.json for a fixture name, a local directory, or a hub id."""
    if is_fixture(name):
        from rlhf.fixtures import resolve_fixture

        return resolve_fixture(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} '{name}' is a file; pass the model directory (with config.json) instead")
        if not (path / "config.json").is_file():
            raise UserError(
                f"{what} directory '{name}' has no config.json; pass a Hugging Face model directory "
                f"(the output of save_pretrained)"
            )
        return path
    if not looks_like_hub_id(name):
        raise UserError(f"{what} '{name}' does not exist; pass an existing directory or a hub id like org/name")
    return _download(name, revision, "model", MODEL_PATTERNS)


TOKENIZER_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_tokenizer(name: str, revision: str | None = None) -> Path:
    """A directory holding the model's tokenizer: the model's own for a fixture or a local directory; for a hub id,
    its tokenizer files alone, so that data can be measured before gigabytes of weights are fetched."""
    if is_fixture(name) or Path(name).expanduser().exists() or not looks_like_hub_id(name):
        return resolve_model(name, revision)
    return _download(name, revision, "model", TOKENIZER_PATTERNS)


def check_weights(path: Path, name: str, what: str = "model") -> None:
    """A local model directory must hold safetensors weights: pickled *.bin files are never loaded (they can run
    code), and a directory with a config alone is no model."""
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise UserError(
            f"{what} directory '{name}' holds only pickled weights (*.bin/*.pt), which rlhf never loads; convert them "
            f"to safetensors (model.save_pretrained(dir, safe_serialization=True)) and pass that directory"
        )
    raise UserError(
        f"{what} directory '{name}' has a config.json but no weights (*.safetensors); pass the directory "
        f"save_pretrained wrote, with its weight files"
    )


def resolve_dataset(name: str) -> Path | str:
    """A local path (file or directory) for a fixture or a local dataset; a hub id is returned as is for `datasets`."""
    if is_fixture(name):
        from rlhf.fixtures import resolve_fixture

        return resolve_fixture(name)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(name) or name.endswith((".json", ".jsonl", ".csv", ".parquet", ".txt")):
        raise UserError(f"dataset '{name}' does not exist; pass an existing file or directory, or a hub id")
    return name
