import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["MMTTS_PROGRESS"] = "0"

import pytest  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private model cache for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MMTTS_CACHE", str(d))
    return d


@pytest.fixture
def single_thread():
    """Small models train faster on one thread than on oversubscribed cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
