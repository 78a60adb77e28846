import warnings

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
