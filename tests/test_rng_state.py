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


def test_vectorised_seeds_and_draws_equal_the_per_candidate_definition():
    """derive_seeds, randn, rand and forks give exactly what the one-stream-at-a-time definition gives
    (a fork: the copy's seed and id derived from its parent's with fork_values' formula)."""
    import numpy as np

    from mmtts.core.rng import derive_seeds, fork_keys

    rs = np.random.default_rng(0)
    a = rs.integers(-2 ** 63, 2 ** 63 - 1, 300, dtype=np.int64)
    b = rs.integers(0, 2 ** 40, 300)
    c = [int(k) for k in rs.choice([1, 2, 2 ** 32, 2 ** 32 + 3], 300)]
    assert derive_seeds(torch.from_numpy(a), b, c).tolist() == [derive_seed(*t) for t in zip(a.tolist(), b.tolist(), c)]
    assert derive_seeds(2 ** 64 - 5, np.arange(20)).tolist() == [derive_seed(2 ** 64 - 5, i) for i in range(20)]

    s = Streams.spawn(3, 12, start=4)
    assert s.seeds.tolist() == [derive_seed(3, 4 + i) for i in range(12)]
    s.counters[5] = 9
    one = lambda i: Streams(s.seeds[i:i + 1], s.counters[i:i + 1])  # noqa: E731  (stream i alone)
    assert torch.equal(s.clone().randn((2, 3)), torch.cat([one(i).randn((2, 3)) for i in range(12)]))
    assert torch.equal(s.clone().rand((4,)), torch.cat([one(i).rand((4,)) for i in range(12)]))
    assert torch.equal(s.clone().rand(), torch.cat([one(i).rand() for i in range(12)]))

    p = CountingProcess()
    st = p.init(Streams.spawn(0, 4))
    st.streams.counters += torch.tensor([0, 3, 1, 2])
    before = (st.streams.seeds.clone(), st.streams.counters.clone(), st.ids.clone(), st.parents.clone())
    idx = [2, 2, 0, 3, 2, 1, 1]
    for fork_all in (False, True):
        got = st.resample(torch.tensor(idx), fork_all=fork_all)
        for j, (src, key) in enumerate(zip(idx, fork_keys(idx, fork_all))):
            if key is None:
                assert (int(got.ids[j]), int(got.parents[j])) == (int(st.ids[src]), int(st.parents[src]))
                assert (int(got.streams.seeds[j]), int(got.streams.counters[j])) == (
                    int(st.streams.seeds[src]), int(st.streams.counters[src]))
            else:
                c = int(st.streams.counters[src])
                assert int(got.parents[j]) == int(st.ids[src])
                assert int(got.ids[j]) == derive_seed(int(st.ids[src]), c, key)
                assert (int(got.streams.seeds[j]), int(got.streams.counters[j])) == (
                    derive_seed(int(st.streams.seeds[src]), c, key), 0)
        same = st.streams.select(torch.tensor(idx), fork_duplicates=True, fork_all=fork_all)
        assert torch.equal(same.seeds, got.streams.seeds) and torch.equal(same.counters, got.streams.counters)
    # the source state is untouched by the gather
    assert all(torch.equal(x, y) for x, y in zip(before, (st.streams.seeds, st.streams.counters, st.ids, st.parents)))
