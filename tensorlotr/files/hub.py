"""Adapters on the Hugging Face Hub: resolve a repo id to a local folder, and upload a folder.

Only ``huggingface_hub`` is used: downloads land in its cache (``cache_dir`` or
``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` read the cache alone,
and uploads go through ``create_repo`` and ``upload_folder``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from concurrent.futures import Future

    from huggingface_hub import CommitInfo

#: The files an adapter repo needs; nothing else is downloaded.
ADAPTER_PATTERNS = ("*.json", "*.safetensors", "*.bin", "README.md")


class HubOptions(TypedDict, total=False):
    """The keyword arguments of :func:`resolve_folder` that loaders pass on as ``**hub_kwargs``.

    Examples
    --------
    >>> options: HubOptions = {"revision": "main", "local_files_only": True}
    >>> sorted(HubOptions.__annotations__)
    ['cache_dir', 'local_files_only', 'revision', 'subfolder', 'token']
    """

    subfolder: str | None
    revision: str | None
    token: str | bool | None
    cache_dir: str | os.PathLike[str] | None
    local_files_only: bool


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value.

    Examples
    --------
    >>> import os
    >>> os.environ["HF_HUB_OFFLINE"] = "1"  # as the command line sets it
    >>> is_offline()
    True
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_folder(
    path_or_id: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    what: str = "adapter",
) -> Path:
    """A local folder for ``path_or_id``: the folder itself, or a Hub repo's snapshot.

    Parameters
    ----------
    path_or_id : path or str
        A local folder, or a Hub repo id (``"user/my-adapter"``).
    subfolder : str, optional
        A folder inside the repo or local folder (a named adapter saved beside the default).
    revision, token, cache_dir, local_files_only
        As in ``huggingface_hub.snapshot_download``. ``HF_HUB_OFFLINE=1`` implies
        ``local_files_only``.
    what : str
        Names the thing in error messages.

    Raises
    ------
    FileNotFoundError
        Naming the folder or repo, when neither a local folder nor a cached (or, online,
        downloadable) snapshot exists.

    Examples
    --------
    >>> import os
    >>> from pathlib import Path
    >>> os.environ["HF_HUB_OFFLINE"] = "1"  # the cache only
    >>> Path("my-adapter/other").mkdir(parents=True)
    >>> print(resolve_folder("my-adapter"), resolve_folder("my-adapter", subfolder="other"))
    my-adapter my-adapter/other
    >>> resolve_folder("user/my-adapter", cache_dir="hf-cache")
    Traceback (most recent call last):
    FileNotFoundError: adapter 'user/my-adapter' is not a local folder; offline ... not in the cache (cache hf-cache)
    """
    local = Path(path_or_id)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
        return folder
    repo_id = os.fspath(path_or_id)
    if local.is_absolute() or repo_id.startswith((".", "~")) or repo_id.count("/") > 1 or not repo_id:
        raise FileNotFoundError(f"{what} folder {repo_id} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = local_files_only or is_offline()
    patterns = [f"{subfolder}/{p}" for p in ADAPTER_PATTERNS] if subfolder else list(ADAPTER_PATTERNS)
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            local_files_only=offline,
            allow_patterns=patterns,
            library_name="tensorlotr",
        )
    except HFValidationError:
        raise FileNotFoundError(f"{what} {repo_id!r} is neither a local folder nor a valid Hub repo id") from None
    except LocalEntryNotFoundError:
        where = f" (cache {cache_dir})" if cache_dir else ""
        reason = "offline (HF_HUB_OFFLINE or local_files_only) and" if offline else "it could not be downloaded, and"
        raise FileNotFoundError(
            f"{what} {repo_id!r} is not a local folder; {reason} the Hub repo is not in the cache{where}"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise FileNotFoundError(f"{what} {repo_id!r}: cannot download it from the Hub: {exc}") from None
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {repo_id!r} has no folder {subfolder!r} at revision {revision or 'main'}")
    return folder


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload LoTR adapter",
    create_pr: bool = False,
    **kwargs: Any,
) -> CommitInfo | Future[CommitInfo]:
    """Create ``repo_id`` if needed and upload the files of ``folder`` (an adapter, never a base model).

    Returns ``upload_folder``'s commit info (a future of it with ``run_as_future=True`` in ``kwargs``).
    Offline (``HF_HUB_OFFLINE=1``) it raises ``ConnectionError`` naming the repo, before any request.

    Examples
    --------
    Online, with a token that may write to ``user``:

    >>> push_folder("my-adapter", "user/my-adapter", private=True)  # doctest: +SKIP

    Offline:

    >>> import os
    >>> os.environ["HF_HUB_OFFLINE"] = "1"
    >>> push_folder("my-adapter", "user/my-adapter")
    Traceback (most recent call last):
    ConnectionError: cannot push to 'user/my-adapter': HF_HUB_OFFLINE is set
    """
    if is_offline():
        raise ConnectionError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit: CommitInfo | Future[CommitInfo] = api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        **kwargs,
    )
    return commit
