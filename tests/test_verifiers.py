import warnings

import numpy as np
import pytest
import torch

import mmtts
from mmtts.core import Cached, MeanRank, VerifierError
from mmtts.core.verifier import FunctionVerifier, NonFiniteScoreWarning, check_scores

from helpers import CountingProcess, SumVerifier


def test_wrong_number_of_scores_is_an_error():
    v = FunctionVerifier(lambda x: x.sum(1)[:-1], name="short")
    with pytest.raises(VerifierError, match=r"'short' returned scores of shape \(2,\) for 3 candidates"):
        v(torch.ones(3, 2))
    with pytest.raises(VerifierError, match="one score per candidate"):
        mmtts.search(CountingProcess(), v, "best-of-n", budget=40)
    with pytest.raises(VerifierError, match="not numbers"):
        FunctionVerifier(lambda x: ["a"] * len(x))(torch.ones(2, 1))


def test_nonfinite_scores_rank_last_with_a_warning():
    s = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    with pytest.warns(NonFiniteScoreWarning, match="2 non-finite"):
        out = check_scores(s, 4, "v")
    assert out.tolist() == [1.0, float("-inf"), 3.0, float("-inf")]
    with pytest.raises(VerifierError, match="non-finite"):
        check_scores(s, 4, "v", nonfinite="error")


def test_search_never_selects_a_nan_candidate():
    # the sum is largest for the NaN candidate's neighbour; NaN must not win
    def score(x):
        s = x.sum(1).clone()
        s[s.argmax()] = float("nan")
        return s
    with pytest.warns(NonFiniteScoreWarning):
        r = mmtts.search(CountingProcess(), FunctionVerifier(score), "best-of-n", budget=40, batch_size=10)
    assert torch.isfinite(r.scores).all()
    for strat in ("particle-filter", "beam"):
        with pytest.warns(NonFiniteScoreWarning):
            r = mmtts.search(CountingProcess(), FunctionVerifier(score), strat, budget=40)
        assert torch.isfinite(r.scores).all()


def test_mean_rank_combines_scales():
    a = FunctionVerifier(lambda x: x[:, 0] * 1000, name="a")
    b = FunctionVerifier(lambda x: -x[:, 0], name="b")
    c = FunctionVerifier(lambda x: x[:, 1], name="c")
    x = torch.tensor([[0.0, 5.0], [1.0, 4.0], [2.0, 3.0]])
    assert MeanRank([a, c])(x).tolist() == [0.5, 0.5, 0.5]
    assert MeanRank([a, b])(x).tolist() == [0.5, 0.5, 0.5]
    assert MeanRank([a, c], weights=[3, 1])(x).tolist() == pytest.approx([0.25, 0.5, 0.75])
    m = MeanRank([FunctionVerifier(lambda x: x[:, 0]), FunctionVerifier(lambda x: x[:, 1])])
    assert m.evaluations == 0
    m(x)
    assert m.evaluations == 6
    with pytest.raises(ValueError, match="weights"):
        MeanRank([a, c], weights=[1])


def test_cache_hits_are_free_and_identical():
    calls = []
    v = Cached(FunctionVerifier(lambda x: (calls.append(len(x)), x.sum(1))[1], name="s"))
    x = torch.randn(4, 3)
    first = v(x)
    again = v(torch.cat([x[[2, 0]], torch.ones(1, 3)]))
    assert calls == [4, 1]
    assert again[:2].tolist() == first[[2, 0]].tolist()
    assert v.evaluations == 5 and v.hits == 2
    # duplicates within a batch are scored once
    v(torch.zeros(3, 3))
    assert calls[-1] == 1


def test_cached_verifier_charges_only_misses():
    v = Cached(SumVerifier())
    r = mmtts.search(CountingProcess(), v, "beam", budget=80, beams=2)
    assert r.budget["verifier_calls"] == v.evaluations
    # beam scores previews of the same candidates at every stage; only new content is paid for
    r2 = mmtts.search(CountingProcess(), v, "beam", budget=80, beams=2)
    assert r2.budget["verifier_calls"] == 0
    assert torch.equal(r.outputs, r2.outputs)


def test_heldout_verifiers_are_reported_but_never_select():
    held = FunctionVerifier(lambda x: -x.sum(1), name="opposite")
    for strat in ("best-of-n", "particle-filter", "beam"):
        with_h = mmtts.search(CountingProcess(), SumVerifier(), strat, budget=80, seed=3, heldout=[held])
        without = mmtts.search(CountingProcess(), SumVerifier(), strat, budget=80, seed=3)
        assert torch.equal(with_h.outputs, without.outputs)
        assert with_h.heldout["opposite"].tolist() == (-with_h.outputs.sum(1)).tolist()
        assert with_h.budget["verifier_calls"] == without.budget["verifier_calls"]
    v = SumVerifier()
    with pytest.raises(mmtts.MmttsError, match="must not be the search verifier"):
        mmtts.search(CountingProcess(), v, "best-of-n", budget=40, heldout={"same": v})


def test_cache_evicts_the_least_recently_used():
    calls = []
    v = Cached(FunctionVerifier(lambda x: (calls.append(x[:, 0].tolist()), x[:, 0])[1], name="id"), max_items=3)
    item = lambda *k: torch.tensor([[float(i)] for i in k])  # noqa: E731
    v(item(1, 2, 3))
    v(item(1))  # a hit makes 1 the most recently used: 2 is now the oldest
    v(item(4))  # evicts 2
    assert calls == [[1.0, 2.0, 3.0], [4.0]]
    v(item(1, 3, 4))  # all kept; used in this order, 1 is now the oldest
    v(item(1))  # and now 3 is
    assert len(calls) == 2
    assert v(item(2)).tolist() == [2.0] and calls[-1] == [2.0]  # 2 was evicted, not 1; adding it evicts 3
    v(item(1, 4))  # hits
    assert len(calls) == 3
    v(item(3))
    assert calls[-1] == [3.0] and v.hits == 7 and v.evaluations == 6
    assert v(item(5, 6, 7, 8, 5)).tolist() == [5.0, 6.0, 7.0, 8.0, 5.0]  # a batch larger than the cache
    with pytest.raises(ValueError, match="max_items"):
        Cached(SumVerifier(), max_items=0)


def test_cache_ranks_nonfinite_last_with_one_warning():
    v = Cached(FunctionVerifier(lambda x: torch.where(x[:, 0] > 0, float("nan"), x[:, 0]), name="nan"))
    x = torch.tensor([[1.0], [-1.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = v(x)
    assert first.tolist() == [float("-inf"), -1.0] and len(caught) == 1
    assert v(x).tolist() == first.tolist()  # a hit


def test_average_ranks_equal_scipy_rankdata():
    from scipy.stats import rankdata

    from mmtts.core.verifier import average_ranks, ranks01
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 50, 1000):
        for values in (torch.randn(n, generator=g), torch.randint(0, 4, (n,), generator=g).double(),
                       torch.where(torch.rand(n, generator=g) < 0.3, float("-inf"), torch.randn(n, generator=g))):
            x = values.double().numpy()
            assert np.array_equal(average_ranks(x), rankdata(x, method="average"))
    assert ranks01(torch.tensor([3.0, float("-inf"), 3.0, 1.0])).tolist() == [5 / 6, 0.0, 5 / 6, 1 / 3]


def _verifier_subclasses():
    import importlib
    import pkgutil

    import mmtts.core.verifier as core
    for pkg in ("core", "verifiers", "modalities", "strategies", "tasks"):
        root = importlib.import_module(f"mmtts.{pkg}")
        for info in pkgutil.walk_packages(root.__path__, f"mmtts.{pkg}."):
            try:
                importlib.import_module(info.name)
            except ImportError as e:  # an optional library that is not installed
                warnings.warn(f"{info.name} not imported: {e}")
    seen, todo = [], [core.Verifier]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return [c for c in seen if c.__module__.startswith("mmtts.")]


def test_no_verifier_overrides_call():
    """Validation and counting live in Verifier.__call__: subclasses implement score (and parts, to delegate)."""
    classes = _verifier_subclasses()
    names = {c.__name__ for c in classes}
    assert {"FunctionVerifier", "MeanRank", "Cached", "ClassifierLogProb", "CLIPScore"} <= names
    assert [c.__qualname__ for c in classes if "__call__" in vars(c)] == []


def test_evaluations_of_ensembles_and_caches_are_their_parts():
    a, b = SumVerifier(), FunctionVerifier(lambda x: -x.sum(1), name="neg")
    ens = Cached(MeanRank([a, b]))
    x = torch.randn(5, 3)
    ens(x)
    ens(x[:2])
    assert (a.evaluations, b.evaluations, ens.evaluations, ens.hits) == (5, 5, 10, 2)


def test_plain_function_taking_context_gets_it_and_its_errors_name_it():
    from mmtts.core.verifier import as_verifier
    with_context = as_verifier(lambda outputs, context: outputs.sum(1) + context)
    assert with_context.takes_context and with_context(torch.ones(2, 3), 1.0).tolist() == [4.0, 4.0]
    assert not as_verifier(lambda outputs, scale=2: outputs.sum(1) * scale).takes_context

    def broken(outputs):
        raise KeyError("missing column")

    with pytest.raises(VerifierError, match="verifier 'broken' raised KeyError"):
        as_verifier(broken)(torch.ones(2, 3))
