"""Lazy registries and a light ``import mmtts``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mmtts
from mmtts.core.registry import ADAPTERS, CATALOG, STRATEGIES, TASKS, VERIFIERS, Registry

ROOT = Path(mmtts.__file__).parent
HEAVY = ("scipy", "diffusers", "transformers", "timm", "open_clip", "sklearn", "matplotlib", "PIL", "gymnasium",
         "mujoco", "triton", "rich", "mmtts.tasks.", "mmtts.modalities.", "mmtts.strategies.", "mmtts.adapters.",
         "mmtts.verifiers.", "mmtts.kernels.")


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_mmtts_loads_no_heavy_module():
    loaded = json.loads(_fresh("import json, sys, mmtts; print(json.dumps(sorted(sys.modules)))"))
    heavy = [m for m in loaded if any(m == h or m.startswith(h if h.endswith(".") else h + ".") for h in HEAVY)]
    assert heavy == []


def test_listing_imports_nothing_and_lists_everything():
    names = json.loads(_fresh(
        "import json, sys, mmtts\n"
        "names = {k: getattr(mmtts, 'list_' + k)() for k in ('strategies', 'adapters', 'tasks', 'verifiers')}\n"
        "assert not [m for m in sys.modules if m.startswith('mmtts.strategies.') or m.startswith('mmtts.tasks.')]\n"
        "print(json.dumps(names))"))
    assert names["strategies"] == sorted(CATALOG["strategy"])
    assert names["tasks"] == sorted(CATALOG["task"])
    assert "alpha-bn" in names["adapters"] and "classifier" in names["verifiers"]


def test_every_registration_in_the_source_is_in_the_catalog():
    """A ``@X.register("name")`` in the package must be listed in the catalog under that module (and vice versa)."""
    found: dict[str, dict[str, str]] = {k: {} for k in CATALOG}
    kinds = {"STRATEGIES": "strategy", "ADAPTERS": "adapter", "TASKS": "task", "VERIFIERS": "verifier"}
    for path in ROOT.rglob("*.py"):
        module = "mmtts." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for reg, name in re.findall(r"@(STRATEGIES|ADAPTERS|TASKS|VERIFIERS)\.register\(\"([^\"]+)\"\)",
                                    path.read_text()):
            found[kinds[reg]][name] = module
    assert found == CATALOG


@pytest.mark.parametrize("registry", [STRATEGIES, ADAPTERS, VERIFIERS, TASKS], ids=lambda r: r.kind)
def test_catalog_names_resolve_to_their_class(registry):
    for name in registry.names():
        cls = registry.get(name)
        assert cls.__module__ == registry.catalog()[name]


def test_old_snake_case_spelling_resolves_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'alpha-bn'"):
        assert ADAPTERS.get("alpha_bn") is ADAPTERS.get("alpha-bn")
    with pytest.warns(DeprecationWarning):
        assert "best_of_n" in STRATEGIES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ADAPTERS.get("alpha-bn")  # the current name warns about nothing


def test_registry_refuses_names_that_are_not_kebab_case():
    reg = Registry("thing")
    with pytest.raises(ValueError, match="kebab-case"):
        reg.register("My_Thing")(type("T", (), {}))


def test_unknown_name_lists_the_catalog_and_suggests():
    with pytest.raises(mmtts.core.UnknownNameError, match="did you mean 'evosearch'"):
        STRATEGIES.get("evosarch")


def test_strategy_modules_are_reachable_and_search_is_the_function():
    import mmtts.strategies.region_vote as rv
    assert mmtts.strategies.region_vote is rv
    assert callable(mmtts.search) and mmtts.search.__module__ == "mmtts"
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        mmtts.strategies.nothing_here


@pytest.mark.parametrize("seed, msg", [(1.5, "whole number"), (True, "whole number"), ("3", "whole number"),
                                        (2 ** 64, "outside"), (-1, "outside")])
def test_search_refuses_seeds_that_would_collide(seed, msg):
    from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward
    with pytest.raises(mmtts.MmttsError, match=msg):
        mmtts.search(GMMDiffusion(DEFAULT_MIXTURE, num_stages=4), QuadraticReward(DEFAULT_TARGET), budget=8,
                     seed=seed)


def test_misspelt_settings_list_the_valid_ones_for_every_kind():
    import torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(mmtts.MmttsError, match=r"adapter 'tent' has no setting 'lr_rate'; "
                                               r"its settings are: model, lr,"):
        mmtts.adapt(model, "tent", lr_rate=1e-3)
    with pytest.raises(mmtts.MmttsError, match="adapter 'bn' has no setting 'alfa'.*did you mean 'alpha'"):
        mmtts.adapt(model, "bn", alfa=0.5)
    with pytest.raises(mmtts.MmttsError, match=r"task 'toy-gmm' has no option\(s\) \['sed'\]"):
        mmtts.create_task("toy-gmm", sed=1)  # a task checks its own options
    assert mmtts.adapt(model, "tent", lr=1e-3).name == "tent"  # a valid setting still builds


def test_lazy_modules_are_refused_with_the_fix():
    import torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3))
    with pytest.raises(mmtts.MmttsError, match="uninitialized lazy parameters.*run one forward pass"):
        mmtts.adapt(model, "tent")
