"""Hub folders (files/hub.py): a repo id resolved from huggingface_hub's cache offline, and pushes refused offline."""

from __future__ import annotations

import pytest
from builders import fake_hub_cache

from tensorlotr.files.hub import push_folder, resolve_folder


def test_resolve_folder_reads_a_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lotr_config.json").write_text("{}")
    snapshot = fake_hub_cache(tmp_path / "cache", "someone/adapter", tmp_path / "src")
    assert resolve_folder("someone/adapter", cache_dir=tmp_path / "cache") == snapshot
    with pytest.raises(FileNotFoundError, match=r"'someone/other'.*not in the cache"):
        resolve_folder("someone/other", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_folder(tmp_path / "missing" / "dir")


def test_push_is_refused_offline_with_the_repo_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="someone/adapter"):
        push_folder(tmp_path, "someone/adapter")
