"""The visual dictionary: EMA arithmetic, decay ramp, straight-through gradient, re-seeding,
bounded memory, and bit-identical dictionaries across ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from soho_core.config import DictionaryConfig
from soho_core.models.visual_dictionary import DictionaryGate, VisualDictionary

ROOT = Path(__file__).resolve().parents[1]


def _small_dictionary(**overrides) -> VisualDictionary:
    """K=3, d=2 with e0=(0,0), e1=(10,0), e2=(0,10) and EMA state (count 1, sum = e)."""
    cfg = DictionaryConfig(size=3, decay_start=0.5, decay_max=0.9, decay_ramp_steps=4, laplace_eps=0.1,
                           dead_threshold=1e-3, **overrides)
    vd = VisualDictionary(cfg, dim=2)
    init = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vd.embedding.copy_(init)
    vd.ema_sum.copy_(init)
    vd.ema_count.fill_(1.0)
    return vd


def test_initial_state_is_alive_and_seeded_by_global_rng():
    torch.manual_seed(3)
    a = VisualDictionary(DictionaryConfig(size=16), dim=4)
    torch.manual_seed(3)
    b = VisualDictionary(DictionaryConfig(size=16), dim=4)
    assert torch.equal(a.embedding, b.embedding)
    # EMA state starts from the embeddings, not from zero (the release's dead-on-arrival bug).
    assert torch.equal(a.ema_sum, a.embedding)
    assert torch.equal(a.ema_count, torch.ones(16))
    assert (a.embedding.norm(dim=1) > 0).all()
    # Buffers, not parameters; everything but the logging window is checkpointed.
    assert list(a.parameters()) == []
    assert {"embedding", "ema_sum", "ema_count", "num_updates", "reseed_seed"} == set(a.state_dict())


def test_ema_update_matches_hand_computation():
    vd = _small_dictionary().train()
    # Three valid vectors and one padded position; the padded one is nearest e2 and must be ignored.
    v = torch.tensor([[[1.0, 1.0], [-1.0, 1.0], [9.0, 1.0], [5.0, 60.0]]])
    mask = torch.tensor([[True, True, True, False]])
    q, idx = vd(v, mask)

    assert idx.tolist() == [[0, 0, 1, -1]]
    # Quantised with the pre-update entries; padding passes through unchanged.
    assert_close(q, torch.tensor([[[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [5.0, 60.0]]]))
    # decay = 0.5 at update 0; batch counts (2, 1, 0), sums ((0, 2), (9, 1), (0, 0)).
    # ema_count = 0.5 * 1 + 0.5 * count
    assert_close(vd.ema_count, torch.tensor([1.5, 1.0, 0.5]))
    # ema_sum = 0.5 * e + 0.5 * sum
    assert_close(vd.ema_sum, torch.tensor([[0.0, 1.0], [9.5, 0.5], [0.0, 5.0]]))
    # n = 3, smoothed = (c + 0.1) / (3 + 3 * 0.1) * 3 = (1.6/1.1, 1.0, 0.6/1.1)
    # embedding = ema_sum / smoothed
    assert_close(vd.embedding, torch.tensor([[0.0, 0.6875], [9.5, 0.5], [0.0, 9.1666667]]))
    assert int(vd.num_updates) == 1


def test_decay_ramp_is_applied_and_capped():
    vd = _small_dictionary()
    assert_close(vd.current_decay(), torch.tensor(0.5))
    decays = []
    x = torch.tensor([[1.0, 1.0]])
    for _ in range(6):  # only entry 0 is ever hit, so entry 2's count shrinks by exactly the decay
        before = vd.ema_count[2].item()
        vd.update(x, torch.tensor([0]))
        decays.append(vd.ema_count[2].item() / before)
    # Linear from 0.5 to 0.9 over 4 updates, then flat at decay_max.
    assert_close(torch.tensor(decays), torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 0.9]))
    vd.num_updates.fill_(1000)
    assert_close(vd.current_decay(), torch.tensor(0.9))


def test_straight_through_gradient_is_exactly_identity():
    torch.manual_seed(0)
    vd = VisualDictionary(DictionaryConfig(size=8), dim=4).train()
    before = vd.embedding.clone()
    v = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    q, idx = vd(v, mask)
    w = torch.randn(2, 5, 4)
    (q * w).sum().backward()
    assert torch.equal(v.grad, w)
    assert_close(q[mask], before[idx[mask]])  # forward value is the (pre-update) entry
    assert torch.equal(q[~mask], v[~mask])


def test_unused_entries_are_reseeded_from_current_features():
    torch.manual_seed(0)
    cfg = DictionaryConfig(size=8, decay_start=0.5, decay_max=0.5, decay_ramp_steps=1, dead_threshold=1e-3)
    vd = VisualDictionary(cfg, dim=4)
    ever = torch.zeros(8, dtype=torch.bool)
    for _ in range(30):
        x = torch.randn(16, 4) + 5.0
        # Only entry 0 is ever assigned: 0.5 ** 10 < 1e-3, so the others die every 10 updates.
        reseeded = vd.update(x, torch.zeros(16, dtype=torch.long))
        if reseeded.any():
            # Each re-seeded entry is one of this step's vectors (up to the tiny noise).
            nearest = torch.cdist(vd.embedding[reseeded], x).min(1).values
            assert (nearest < 0.1).all(), nearest
            assert torch.equal(vd.ema_count[reseeded], torch.ones(int(reseeded.sum())))
            assert_close(vd.ema_sum[reseeded], vd.embedding[reseeded])
        ever |= reseeded
    assert ever[1:].all() and not ever[0]
    # Without re-seeding, the unused rows would have decayed to ~0 (ema_sum ~ 0.5 ** 30).
    assert (vd.embedding.norm(dim=1) > 1.0).all()
    assert (vd.ema_count >= cfg.dead_threshold).all()


def test_usage_stats_window():
    vd = _small_dictionary()
    assert vd.usage_stats() == {"vd_usage": 0.0, "vd_perplexity": 0.0}
    vd.update(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]))
    stats = vd.usage_stats()
    assert stats["vd_usage"] == pytest.approx(2 / 3)
    assert stats["vd_perplexity"] == pytest.approx(2.0)  # two entries used equally
    assert "window_counts" not in vd.state_dict()
    vd.update(torch.zeros(3, 2), torch.tensor([2, 2, 2]))
    assert vd.usage_stats() == {"vd_usage": pytest.approx(1 / 3), "vd_perplexity": pytest.approx(1.0)}


def test_gate_mixes_per_position():
    torch.manual_seed(0)
    gate = DictionaryGate(8)
    q, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out = gate(q, v)
    g = gate.gate(torch.cat([gate.proj(q), v], -1)).softmax(-1)
    assert_close(out, g[..., :1] * gate.proj(q) + g[..., 1:] * v)


_MEMORY_PROBE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F

    def _no_one_hot(*args, **kwargs):
        raise AssertionError("one_hot was called")
    F.one_hot = _no_one_hot

    from soho_core.config import DictionaryConfig
    from soho_core.models.visual_dictionary import VisualDictionary

    def status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    torch.manual_seed(0)
    vd = VisualDictionary(DictionaryConfig(size=2048), dim=8).train()
    x = torch.randn(100_000, 8)
    vd.update(x[:100], vd.assign(x[:100]))  # warm up kernels and lazy allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS, forgetting the import's peak
    before = status_kb("VmRSS")
    idx = vd.assign(x)
    vd.update(x, idx)
    v = x.view(1, -1, 8)
    vd(v, torch.ones(1, v.shape[1], dtype=torch.bool))
    print((status_kb("VmHWM") - before) // 1024)
""")


def test_assign_and_update_never_build_n_by_k_tensors():
    # 100k x 2048 would be 205 MB even as bool, 819 MB as fp32 distances, 1.6 GB as a long one-hot.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
           # Big blocks go straight to mmap and back to the OS when freed, so the peak RSS is the
           # peak of live tensors, not of what malloc kept cached.
           "MALLOC_MMAP_THRESHOLD_": "1048576"}
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, env=env,
                         timeout=120)
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert res.returncode == 0, res.stderr
    grew_mb = int(res.stdout.split()[-1])
    assert grew_mb < 100, f"peak memory grew by {grew_mb} MB while quantising 100k vectors against K=2048"


# ---------------------------------------------------------------------------- two ranks

_RANK_SIZES = (24, 40)  # different numbers of valid vectors per rank
_STEPS = 8


def _rank_features(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    # Clustered features: few entries get hit, so others die and are re-seeded mid-run.
    return [torch.randn(_RANK_SIZES[rank], 4, generator=g) * 0.5 + 1.0 for _ in range(_STEPS)]


def _ddp_cfg() -> DictionaryConfig:
    return DictionaryConfig(size=16, decay_start=0.5, decay_max=0.6, decay_ramp_steps=4, dead_threshold=0.05)


def _run(vd: VisualDictionary, steps: list[torch.Tensor]) -> int:
    reseeds = 0
    for x in steps:
        reseeds += int(vd.update(x, vd.assign(x)).sum())
    return reseeds


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        vd = VisualDictionary(_ddp_cfg(), dim=4).train()
        reseeds = _run(vd, _rank_features(rank))
        state = {k: v.clone() for k, v in vd.state_dict().items()}
        state["window_counts"] = vd.window_counts.clone()
        torch.save({"state": state, "reseeds": reseeds}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_keep_bit_identical_dictionaries(tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["reseeds"] > 0, "the run must include a re-seed to test its cross-rank agreement"
    assert r0["reseeds"] == r1["reseeds"]
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key

    # One process that sees both ranks' vectors (in rank order) reaches the same dictionary.
    torch.manual_seed(0)
    single = VisualDictionary(_ddp_cfg(), dim=4).train()
    both = [torch.cat(pair) for pair in zip(_rank_features(0), _rank_features(1))]
    assert _run(single, both) == r0["reseeds"]
    for key in ("embedding", "ema_sum", "ema_count", "num_updates"):
        assert_close(single.state_dict()[key], r0["state"][key], rtol=1e-5, atol=1e-5)
    assert_close(single.window_counts, r0["state"]["window_counts"])
