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
    from mmtts.core.threads import one_thread
    with one_thread():
        yield


@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository (e.g. "benchmarks/vla/latency.py") as a module."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(relpath: str):
        spec = importlib.util.spec_from_file_location(Path(relpath).stem, root / relpath)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
