"""GUI-RCPO: grouped advantages, rewards per prompt, exact reset, and that adaptation raises consistency."""

import numpy as np
import pytest
import torch

from mmtts.adapters.gui_rcpo import GUIRCPO, group_advantages, grouped_region_rewards
from mmtts.core.errors import MmttsError
from mmtts.core.registry import ADAPTERS
from mmtts.modalities.gui.model import BoxGrounding, ElementBoxNet, GroundingNet, tokenize
from mmtts.strategies.region_vote import point_boxes, region_rewards


pytestmark = pytest.mark.usefixtures("single_thread")


def test_group_advantages_match_per_group_normalisation():
    rng = np.random.default_rng(0)
    r = torch.from_numpy(rng.random(12))
    g = torch.tensor([3, 1, 3, 3, 1, 7, 7, 1, 3, 7, 1, 7])
    a = group_advantages(r, g)
    for gid in (1, 3, 7):
        m = g == gid
        x = r[m]
        torch.testing.assert_close(a[m], (x - x.mean()) / (x.std(unbiased=False) + 1e-6))
    assert group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1])).abs().max() == 0


def test_groups_never_mix_prompts():
    rng = np.random.default_rng(1)
    r = torch.from_numpy(rng.random(16))
    g = torch.arange(16) % 4
    a = group_advantages(r, g)
    # changing one prompt's rewards leaves every other prompt's advantages unchanged
    r2 = r.clone()
    r2[g == 2] *= 10
    a2 = group_advantages(r2, g)
    torch.testing.assert_close(a[g != 2], a2[g != 2])
    # the order of the batch does not matter: advantages follow their samples
    perm = torch.from_numpy(rng.permutation(16))
    torch.testing.assert_close(group_advantages(r[perm], g[perm]), a[perm])


def test_grouped_rewards_are_per_prompt_region_rewards():
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 300, (24, 2))
    groups = np.repeat([5, 9, 5], 8)             # prompt 5 appears twice in the batch: one group of 16
    sizes = {5: (300, 300), 9: (200, 120)}
    r = grouped_region_rewards(pts, groups, sizes, alpha=50)
    m = groups == 5
    np.testing.assert_allclose(r[m], region_rewards(point_boxes(pts[m], 50), 300, 300))
    np.testing.assert_allclose(r[~m], region_rewards(point_boxes(pts[~m], 50), 200, 120))
    # prompt 9's rewards ignore prompt 5's clicks even where they overlap on screen
    pts2 = pts.copy()
    pts2[m] = pts[~m][0]
    np.testing.assert_allclose(grouped_region_rewards(pts2, groups, sizes, 50)[~m], r[~m])


def test_box_answers_vote_with_their_boxes():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 300, (16, 2))
    boxes = np.concatenate([pts - rng.uniform(5, 60, (16, 2)), pts + rng.uniform(5, 60, (16, 2))], 1)
    groups = np.repeat([1, 2], 8)
    sizes = {1: (300, 300), 2: (320, 200)}
    r = grouped_region_rewards(pts, groups, sizes, 50, boxes=boxes)
    for g in (1, 2):
        m = groups == g
        np.testing.assert_allclose(r[m], region_rewards(boxes[m], *sizes[g]))
    # squares of side alpha given as boxes are the point answers
    np.testing.assert_allclose(grouped_region_rewards(pts, groups, sizes, 50, boxes=point_boxes(pts, 50)),
                               grouped_region_rewards(pts, groups, sizes, 50))


def test_rcpo_with_box_answers_passes_the_sampled_boxes():
    torch.manual_seed(0)
    net = BoxGrounding(GroundingNet(width=8), ElementBoxNet(width=8))
    seen = {}

    def reward(points, groups, sizes, alpha, boxes):
        seen["points"], seen["boxes"] = points, boxes
        return grouped_region_rewards(points, groups, sizes, alpha, boxes=boxes)

    batch = _batch()
    start = {n: p.clone() for n, p in net.named_parameters()}
    head = {n: p.clone() for n, p in net.named_parameters() if n.startswith("boxes.")}
    adapter = GUIRCPO(net, n=8, lr=1e-3, answers="box", reward=reward)
    adapter(batch)
    b, p = seen["boxes"], seen["points"]
    assert b.shape == (32, 4) and (b[:, :2] <= b[:, 2:]).all()
    # every box lies in its screen and holds the centre of the cell its click fell in
    sizes = batch["sizes"].double().repeat_interleave(8, 0).numpy()
    assert (b >= 0).all() and (b[:, 2:] <= sizes).all()
    cols, rows = net.cells
    centre = (np.floor(p / sizes * [cols, rows]) + 0.5) / [cols, rows] * sizes
    assert ((b[:, :2] <= centre + 1e-6) & (centre <= b[:, 2:] + 1e-6)).all()
    # the update moves the click distribution, never the box network
    assert head and all(torch.equal(p, head[n]) for n, p in adapter.model.named_parameters() if n in head)
    assert any(not torch.equal(p, q) for (n, p), q in zip(adapter.model.named_parameters(), start.values())
               if n.startswith("policy."))
    with pytest.raises(MmttsError, match="boxes"):
        GUIRCPO(GroundingNet(width=8), answers="box")
    with pytest.raises(MmttsError, match="answers="):
        GUIRCPO(net, answers="polygon")


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["click the red star icon", "close the window", "click 'Save' in the side menu", "click the last file"]
    return {"images": torch.rand(n, 3, 112, 192, generator=g), "tokens": tokenize(texts[:n]),
            "sizes": torch.tensor([[1920, 1080], [1280, 720], [2560, 1440], [1440, 900]][:n]),
            "ids": torch.arange(n)}


def _entropy(net, batch):
    with torch.no_grad():
        logp = torch.log_softmax(net(batch["images"], batch["tokens"]).flatten(1), 1)
    return float(-(logp.exp() * logp).sum(1).mean())


def test_rcpo_adapts_resets_exactly_and_concentrates_the_policy():
    torch.manual_seed(0)
    net = GroundingNet(width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ad = ADAPTERS.create("gui-rcpo", net, n=16, lr=1e-2, beta=0.0, seed=3)
    assert isinstance(ad, GUIRCPO)
    batch = _batch()
    h0 = _entropy(net, batch)
    first = ad(batch)
    assert first.shape == (4, 2) and (first >= 0).all() and (first <= batch["sizes"]).all()
    for _ in range(10):
        ad(batch)
    assert _entropy(net, batch) < h0 - 0.05      # consistent clicks were reinforced
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    ad.reset()
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    assert ad.updates == 0


def test_rcpo_is_deterministic_and_kl_holds_the_policy_back():
    def run(beta):
        torch.manual_seed(0)
        net = GroundingNet(width=8)
        ad = GUIRCPO(net, n=8, lr=1e-2, beta=beta, seed=1)
        for _ in range(5):
            ad(_batch())
        return net, ad

    a, _ = run(0.0)
    b, _ = run(0.0)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    torch.manual_seed(0)
    start = GroundingNet(width=8).state_dict()
    strong, _ = run(50.0)
    drift = lambda m: sum(float((m.state_dict()[k] - start[k]).abs().sum()) for k in start)  # noqa: E731
    assert drift(strong) < drift(a)


def test_rcpo_bad_input():
    net = GroundingNet(width=8)
    with pytest.raises(MmttsError, match="n >= 2"):
        GUIRCPO(net, n=1)
    with pytest.warns(DeprecationWarning, match="n="):
        assert GUIRCPO(net, samples=8).n == 8       # the old keyword still works
    with pytest.raises(MmttsError, match="twice"):
        GUIRCPO(net, n=8, samples=8)
    with pytest.raises(MmttsError, match="matches no parameter"):
        GUIRCPO(net, include=["nothing.*"])
    ad = GUIRCPO(net, include=["head.*"])
    assert ad.adapted_names() == ["head.0.weight", "head.0.bias"]
    b = _batch()
    del b["ids"]
    with pytest.raises(MmttsError, match="ids"):
        ad(b)
    with pytest.raises(MmttsError, match="empty batch"):
        ad({k: v[:0] for k, v in _batch().items()})


def test_rcpo_update_with_a_labelled_reward_raises_the_target_mass():
    """With a reward that pays clicks inside a known box, the GRPO step is supervised RL: the box gains mass."""
    torch.manual_seed(0)
    net = GroundingNet(width=8)
    batch = _batch()
    target = (0.6, 0.2, 0.8, 0.5)                                     # fractions of the screen

    def inside(points, groups, sizes, alpha):
        wh = np.array([sizes[int(g)] for g in groups], dtype=float)
        u = points / wh
        return ((u[:, 0] >= target[0]) & (u[:, 0] <= target[2]) & (u[:, 1] >= target[1])
                & (u[:, 1] <= target[3])).astype(float)

    def mass():
        with torch.no_grad():
            p = torch.softmax(net(batch["images"], batch["tokens"]).flatten(1), 1).reshape(4, *net.cells[::-1])
        rows, cols = p.shape[1:]
        return float(p[:, int(target[1] * rows):int(target[3] * rows), int(target[0] * cols):int(target[2] * cols)]
                     .sum((1, 2)).mean())

    m0 = mass()
    ad = GUIRCPO(net, n=32, lr=3e-2, beta=0.0, seed=0, reward=inside)
    for _ in range(20):
        ad(batch)
    assert mass() > 3 * m0


def test_rcpo_refuses_a_bad_reward():
    net = GroundingNet(width=8)
    short = GUIRCPO(net, n=4, reward=lambda p, g, s, a: np.zeros(len(p) - 1))
    with pytest.raises(MmttsError, match="one finite number per click"):
        short(_batch())
    nan = GUIRCPO(GroundingNet(width=8), n=4, reward=lambda p, g, s, a: np.full(len(p), np.nan))
    with pytest.raises(MmttsError, match="non-finite"):
        nan(_batch())
