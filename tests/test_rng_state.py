import pytest
import torch

from mmtts.core import State, Streams
from mmtts.core.rng import StrategyRNG, derive_seed

from helpers import CountingProcess


def test_same_seed_same_noise_and_stream_independent_of_batch():
    a = Streams.spawn(7, 3).randn((5,))
    b = Streams.spawn(7, 3).randn((5,))
    assert torch.equal(a, b)
    # stream i is the same whatever the batch it was spawned in
    c = Streams.spawn(7, 5).randn((5,))
    assert torch.equal(a, c[:3])
    d = Streams.spawn(7, 2, start=1).randn((5,))
    assert torch.equal(a[1:], d)
    assert not torch.equal(a[0], a[1])


def test_streams_advance_and_differ_by_seed():
    s = Streams.spawn(0, 2)
    first, second = s.randn((4,)), s.randn((4,))
    assert not torch.equal(first, second)
    assert s.counters.tolist() == [2, 2]
    assert not torch.equal(Streams.spawn(1, 2).randn((4,)), first)


def test_noise_is_standard_normal():
    x = Streams.spawn(3, 400).randn((50,))
    assert abs(float(x.mean())) < 0.02
    assert abs(float(x.std()) - 1.0) < 0.02


def test_select_copies_streams_and_resample_forks_duplicates():
    p = CountingProcess()
    st = p.init(Streams.spawn(0, 3))
    idx = torch.tensor([2, 2, 0])
    copy = st.select(idx)
    assert torch.equal(copy.streams.seeds, st.streams.seeds[idx])
    child = st.resample(idx)
    # first copy of candidate 2 keeps its id and stream; the second is a child with a new stream
    assert child.ids[0] == st.ids[2] and child.parents[0] == st.parents[2]
    assert child.ids[1] != st.ids[2] and child.parents[1] == st.ids[2]
    assert child.origin.tolist() == [2, 2, 0]
    nxt = p.step(child)
    ref = p.step(st)
    assert torch.equal(nxt.data["x"][0], ref.data["x"][2])   # continues its own noise stream
    assert torch.equal(nxt.data["x"][2], ref.data["x"][0])
    assert not torch.equal(nxt.data["x"][0], nxt.data["x"][1])  # the fork diverges


def test_resample_is_deterministic():
    p = CountingProcess()
    st = p.init(Streams.spawn(5, 4))
    a = p.step(st.resample([1, 1, 1, 3]))
    b = p.step(st.resample([1, 1, 1, 3]))
    assert torch.equal(a.data["x"], b.data["x"]) and torch.equal(a.ids, b.ids)
    assert len(set(a.ids.tolist())) == 4


def test_cat_and_state_dict_roundtrip():
    p = CountingProcess()
    a, b = p.init(Streams.spawn(0, 2)), p.init(Streams.spawn(1, 3), first_index=2)
    c = State.cat([a, b])
    assert len(c) == 5 and c.origin.tolist() == [0, 1, 2, 3, 4]
    r = State.from_state_dict(c.state_dict())
    assert torch.equal(p.step(r).data["x"], p.step(c).data["x"])


def test_bad_state_shapes_and_indices():
    s = Streams.spawn(0, 2)
    with pytest.raises(ValueError, match="batch"):
        State.fresh({"x": torch.zeros(3, 2)}, s)
    st = State.fresh({"x": torch.zeros(2, 2)}, s)
    with pytest.raises(IndexError, match="out of range"):
        st.select([0, 2])
    with pytest.raises(ValueError, match="different fields"):
        State.cat([st, State.fresh({"y": torch.zeros(2)}, Streams.spawn(1, 2))])


def test_strategy_rng_checkpoints_as_two_integers():
    r = StrategyRNG(11)
    r.numpy()
    saved = r.state_dict()
    a = r.numpy().random(3)
    b = StrategyRNG.from_state_dict(saved).numpy().random(3)
    assert (a == b).all()
    assert derive_seed(1, 2) != derive_seed(2, 1)
