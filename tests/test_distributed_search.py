"""Sharded search: two CPU processes (gloo) return the Result of one process, on every rank.

The test spawns the two ranks itself (this file is their script), with a
timeout, and compares what each rank returned with the same searches run here
in one process. The image cases keep every shard at 4 candidates or more: the
tiny UNet's CPU convolutions round differently below that batch size (see
docs/scale-out.md, batch invariance).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
WORLD = 2
TIMEOUT = 150


def toy():
    from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward
    return GMMDiffusion(DEFAULT_MIXTURE, 8, sampler="exact"), QuadraticReward(DEFAULT_TARGET, width=1.0)


def image(eta: float):
    from diffusers import DDIMScheduler
    from image_fixtures import tiny_unet

    from mmtts.modalities.image import ImageProcess, schedule_from_scheduler
    sched = schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), 4, eta=eta)
    return ImageProcess(tiny_unet(), sched, (1, 8, 8))


def var():
    from mmtts.modalities.var import MultiScaleVQ, NextScaleTransformer, VARProcess
    scales = (1, 2, 3, 4, 6, 8)
    torch.manual_seed(1)
    tok = MultiScaleVQ(scales, vocab=16, code_dim=4, width=4).eval()
    with torch.no_grad():
        tok.decoder[-1].bias.fill_(0.5)
    tf = NextScaleTransformer(scales, vocab=16, code_dim=4, width=16, depth=1, heads=2).eval()
    return VARProcess(tok, tf)


def ink(images, context=None):
    return images.mean((1, 2, 3)) * 10


def pixels(images):
    return images.flatten(1)


def brightness(x, context=None):
    return x.float().mean((1, 2, 3)) - (x.float() - 0.3).abs().mean((1, 2, 3))


#: (name, process factory, verifier factory, strategy, settings, budget); the image verifier is a function
CASES = [
    ("toy/best-of-n", lambda: toy()[0], lambda: toy()[1], "best-of-n", {"batch_size": 16}, 320),
    ("toy/evosearch", lambda: toy()[0], lambda: toy()[1], "evosearch", {"n": 12}, 320),
    ("toy/particle-filter", lambda: toy()[0], lambda: toy()[1], "particle-filter",
     {"lmbda": 10.0, "potential": "diff"}, 320),
    ("image/best-of-n", lambda: image(0.0), lambda: brightness, "best-of-n", {}, 40),
    ("image/evosearch", lambda: image(0.0), lambda: brightness, "evosearch",
     {"n": 8, "noise_generations": 0, "latent_scale": 0.5}, 40),
    ("image/particle-filter", lambda: image(1.0), lambda: brightness, "particle-filter",
     {"lmbda": 1.0, "potential": "max"}, 40),
    # the VAR process: its KV caches are State data, gathered and re-indexed with the candidates
    ("image/var-tts-var", var, lambda: ink, "tts-var", {"features": pixels, "keep": 2}, 16 * 130),
]


def search(case, distributed: bool):
    from mmtts.core.registry import STRATEGIES
    from mmtts.core.strategy import run_strategy
    _, process, verifier, strategy, settings, budget = case
    res = run_strategy(STRATEGIES.create(strategy, **settings), process(), verifier(), budget, seed=7,
                       distributed=distributed)
    return {"outputs": res.outputs, "scores": res.scores, "lineage": res.lineage, "nfe": res.budget["nfe"],
            "verifier_calls": res.budget["verifier_calls"], "decodes": res.budget["decodes"],
            "trace": [(t["nfe"], t["verifier_calls"], t["best"], t["scores"]) for t in res.trace],
            "population_scores": res.population_scores}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def launch(scenario: str, out: Path, timeout: float = TIMEOUT, dist_timeout: float = 60):
    """Start the ranks of ``scenario`` with the launcher's environment; return (returncode, output) per rank."""
    from mmtts.distributed.launch import free_port
    port = str(free_port())
    procs = []
    for r in range(WORLD):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "MMTTS_DIST_TIMEOUT": str(dist_timeout),
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank of {scenario!r} did not finish within {timeout} s (a hang)")
        results.append((p.returncode, output))
    return results


def check_sharded_equals_one_process(group: str, out: Path) -> list:
    for case in [c for c in CASES if c[0].startswith(group + "/")]:
        want = search(case, distributed=False)
        for r in range(WORLD):
            got = torch.load(out / f"rank{r}.pt", weights_only=False)
            assert same(got["results"][case[0]], want), f"{case[0]} on rank {r} differs from one process"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def toy_ranks(tmp_path_factory):
    """One launch of two ranks: the toy searches, the rank-0 verifier, gathers, then a search where rank 1 fails."""
    out = tmp_path_factory.mktemp("toy")
    return out, launch("toy", out)


def test_sharded_search_equals_one_process_toy_and_rank_zero_verifier(toy_ranks):
    out, runs = toy_ranks
    ranks = check_sharded_equals_one_process("toy", out)
    traffic = ranks[0]["traffic"]
    assert traffic["received"]["step"] > 0 and traffic["received"]["score"] > 0
    # the rank-0 verifier: scored on rank 0 only, its scores broadcast, the count global
    want = search(CASES[0], distributed=False)
    for r, got in enumerate(ranks):
        assert same(got["rank0"], want), f"rank-0 verifier search on rank {r} differs from one process"
    assert [got["rank0_calls"] for got in ranks] == [want["verifier_calls"], 0]
    # a deadline strikes every rank at the same step: rank 0's clock
    assert ranks[0]["deadline"]["stopped"] == "deadline" and 0 < ranks[0]["deadline"]["nfe"] < 8 * 100_000
    assert same(ranks[0]["deadline"], ranks[1]["deadline"])
    for got in ranks:  # gathered in rank order, dtypes and nesting kept
        assert same(got["dict"], {"x": torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3], dtype=torch.float16),
                                  "meta": {"id": torch.tensor([0, 10, 11]), "ok": torch.tensor([True, False, False])}})
        assert got["list"] == ["rank0-0", "rank1-0", "rank1-1"]


def test_a_failing_rank_stops_every_rank_with_its_error(toy_ranks):
    _, runs = toy_ranks  # the launch's last search fails on rank 1; launch() fails the test on a hang
    for rc, output in runs:
        assert rc != 0
        assert "rank 1 failed: VerifierError: verifier 'breaks' raised RuntimeError: verifier broke on rank 1" in output, output


@pytest.mark.slow
def test_sharded_search_equals_one_process_image(tmp_path):
    runs = launch("image", tmp_path)
    for rc, output in runs:
        assert rc == 0, output
    check_sharded_equals_one_process("image", tmp_path)


def test_distributed_refuses_what_it_cannot_share():
    import mmtts
    from mmtts.core.registry import STRATEGIES
    from mmtts.core.strategy import run_strategy
    p, v = toy()
    with pytest.raises(mmtts.MmttsError, match="checkpoint"):
        run_strategy(STRATEGIES.create("best-of-n"), p, v, 80, distributed=True, checkpoint="x.pt")


def test_distributed_without_a_launcher_is_one_process():
    assert same(search(CASES[2], distributed=True), search(CASES[2], distributed=False))


def worker(scenario: str, out: Path) -> None:
    from mmtts.core.registry import STRATEGIES
    from mmtts.core.strategy import run_strategy
    from mmtts.distributed import run_on_rank_zero
    from mmtts.distributed.comm import traffic
    rank = int(os.environ["RANK"])
    if scenario in ("toy", "image"):
        saved = {"results": {c[0]: search(c, distributed=True) for c in CASES if c[0].startswith(scenario + "/")},
                 "traffic": traffic()}
        if scenario == "toy":
            from mmtts.distributed import Comm
            comm = Comm()  # the batch shapes a process may return: nested dicts of mixed dtypes, lists
            saved["dict"] = comm.all_gather_batch("test", lambda: {
                "x": torch.full((rank + 1, 3), float(rank), dtype=torch.float16),
                "meta": {"id": torch.arange(rank + 1, dtype=torch.int64) + 10 * rank,
                         "ok": torch.tensor([rank == 0] * (rank + 1))}})
            saved["list"] = comm.all_gather_batch("test", lambda: [f"rank{rank}-{i}" for i in range(rank + 1)])
            verifier = run_on_rank_zero(toy()[1])
            saved["rank0"] = search(CASES[0][:2] + (lambda: verifier,) + CASES[0][3:], distributed=True)
            saved["rank0_calls"] = verifier.evaluations
            import mmtts
            res = run_strategy(STRATEGIES.create("best-of-n", batch_size=16), toy()[0], toy()[1],
                               mmtts.Budget(max_nfe=8 * 100_000, max_seconds=0.3), seed=1, distributed=True)
            saved["deadline"] = {"outputs": res.outputs, "scores": res.scores, "lineage": res.lineage,
                                 "stopped": res.stopped, "nfe": res.budget["nfe"], "trace": res.trace}
        torch.save(saved, out / f"rank{rank}.pt")
    if scenario == "toy":
        process, reward = toy()

        def breaks(x, context=None):
            if rank == 1:
                raise RuntimeError("verifier broke on rank 1")
            return reward(x)
        run_strategy(STRATEGIES.create("best-of-n"), process, breaks, 80, seed=0, distributed=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(sys.argv[1], Path(sys.argv[2]))


def test_mmtts_search_passes_distributed_on():
    import mmtts
    _, process, verifier, strategy, settings, budget = CASES[2]
    res = mmtts.search(process(), verifier(), strategy, budget=budget, seed=7, distributed=True, **settings)
    want = search(CASES[2], distributed=False)
    assert torch.equal(torch.as_tensor(res.scores), torch.as_tensor(want["scores"]))
    with pytest.raises(mmtts.MmttsError, match="checkpoint"):
        mmtts.search(process(), verifier(), strategy, budget=budget, distributed=True, checkpoint="x.pt", **settings)
