import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["MMTTS_PROGRESS"] = "0"

import pytest  # noqa: E402

try:  # hypothesis profiles of the fuzz suites: "ci" (the default) keeps each module short, "long" runs many more
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    pass
else:
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=1000, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
