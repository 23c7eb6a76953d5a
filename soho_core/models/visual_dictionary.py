"""The visual dictionary (VD): K "visual words" that group similar CNN feature vectors.

Every valid feature vector v_i takes the index of its nearest embedding (L2) and is replaced
by that embedding with a straight-through gradient, q_i = v_i + stopgrad(e_idx - v_i). The
embeddings are not learned by gradient descent: in training they follow an exponential
moving average (EMA) of the vectors assigned to them, with Laplace-smoothed counts.

Differences from the reference release, on purpose:
  * the EMA state starts FROM the initial embeddings (count 1 each), not from zero, so an
    entry that is not hit in the first step keeps its vector instead of collapsing to 0;
  * the decay ramp is really applied (decay_start -> decay_max over decay_ramp_steps);
  * entries whose EMA count falls under ``dead_threshold`` are re-seeded from current features;
  * the cross-rank reduction is a no-op without a process group, so the module runs anywhere;
  * per-entry sums/counts use index_add_/bincount: no N x K one-hot is ever built.

Multi-process invariant: every rank ends each update with bit-identical buffers. Ranks reduce
the same (K, d+1) statistics with one all-reduce, then run the same deterministic arithmetic;
re-seeding draws its candidates with a generator every rank seeds identically.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from soho_core.config import DictionaryConfig

# Rows of the (chunk, K) distance matrix are bounded so memory stays ~16 MB in fp32.
_CHUNK_ELEMENTS = 1 << 22
# Re-seeded entries get this much Gaussian noise, relative to the RMS of the copied vector,
# so two dead entries that draw the same feature vector still differ.
_RESEED_NOISE = 1e-3


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is absent or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class VisualDictionary(nn.Module):
    """K embeddings of width ``dim`` held in buffers, with EMA updates in training mode.

    Buffers (all in ``state_dict`` except the logging window):
      embedding (K, d) float, ema_sum (K, d) float, ema_count (K,) float,
      num_updates () long, reseed_seed () long, window_counts (K,) float64 [non-persistent].
    """

    def __init__(self, cfg: DictionaryConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.size = cfg.size
        self.dim = dim
        # Drawn from the global RNG: the same seed gives the same dictionary on every rank.
        # Unit variance matches the BatchNorm-ed features the dictionary sees.
        init = torch.randn(cfg.size, dim)
        self.register_buffer("embedding", init)
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("ema_count", torch.ones(cfg.size))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("reseed_seed", torch.randint(0, 2**31 - 1, (), dtype=torch.long))
        self.register_buffer("window_counts", torch.zeros(cfg.size, dtype=torch.float64), persistent=False)

    # ------------------------------------------------------------------ assignment

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> index (N,) long of the nearest embedding in L2, computed in row chunks."""
        e = self.embedding.float()
        x = x.detach().float()
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; the first term does not change the argmin.
        e_sq = (e * e).sum(1)
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // self.size)
        for start in range(0, x.shape[0], step):
            dist_sq = torch.addmm(e_sq, x[start:start + step], e.t(), alpha=-2.0)
            out[start:start + step] = dist_sq.argmin(1)
        return out

    # ------------------------------------------------------------------ EMA update

    def current_decay(self) -> torch.Tensor:
        """Decay the next update will use: linear in num_updates from decay_start to decay_max."""
        c = self.cfg
        frac = (self.num_updates.float() / c.decay_ramp_steps).clamp(max=1.0)
        return c.decay_start + (c.decay_max - c.decay_start) * frac

    @torch.no_grad()
    def update(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One EMA step from this rank's valid vectors x (N, d) and their indices idx (N,).

        Returns a (K,) bool mask of the entries re-seeded by this step (same on every rank).
        """
        x = x.detach().float()
        k, d = self.size, self.dim
        # Sums and counts side by side in one (K, d+1) buffer: one collective, not two.
        stats = torch.zeros(k, d + 1, device=x.device)
        stats[:, :d].index_add_(0, idx, x)
        stats[:, d] = torch.bincount(idx, minlength=k).to(x.dtype)
        stats = _all_reduce_sum_(stats)
        sums, counts = stats[:, :d], stats[:, d]

        decay = self.current_decay()
        # ema = decay * ema + (1 - decay) * new, in one pass over each buffer
        self.ema_count.lerp_(counts, 1.0 - decay)
        self.ema_sum.lerp_(sums, 1.0 - decay)
        n = self.ema_count.sum()
        eps = self.cfg.laplace_eps
        smoothed = (self.ema_count + eps) / (n + k * eps) * n
        self.embedding.copy_(self.ema_sum / smoothed[:, None])

        self.window_counts.add_(counts.double())
        self.num_updates.add_(1)
        return self._reseed_dead(x)

    def _reseed_dead(self, x: torch.Tensor) -> torch.Tensor:
        """Give entries that fell out of use a current feature vector.

        Candidates are drawn from the concatenation of all ranks' vectors (in rank order) with a
        generator seeded from (reseed_seed, num_updates), identical everywhere. Each rank fills
        the rows it owns and zeros elsewhere; a SUM all-reduce then adds exact zeros, so every
        rank gets the same bits, and a single process on the concatenated batch picks the same.

        The re-seeded entry restarts at ema_count = 1 (ema_sum = vector): the weight of one
        observation. That is large enough to survive ~log(dead_threshold)/log(decay) updates
        while it attracts vectors, and small enough that the next real assignments dominate it.
        """
        dead = self.ema_count < self.cfg.dead_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return dead
        rank, world = _world()
        sizes = torch.zeros(world, dtype=torch.long, device=x.device)
        sizes[rank] = x.shape[0]
        sizes = _all_reduce_sum_(sizes).tolist()
        total, offset = sum(sizes), sum(sizes[:rank])
        if total == 0:
            return torch.zeros_like(dead)

        gen = torch.Generator().manual_seed(int(self.reseed_seed) + int(self.num_updates))
        if total >= num_dead:
            pick = torch.randperm(total, generator=gen)[:num_dead]
        else:
            pick = torch.randint(total, (num_dead,), generator=gen)
        noise = torch.randn(num_dead, self.dim, generator=gen)

        pick = pick.to(x.device)
        mine = (pick >= offset) & (pick < offset + x.shape[0])
        cand = torch.zeros(num_dead, self.dim, device=x.device)
        cand[mine] = x[pick[mine] - offset]
        cand = _all_reduce_sum_(cand)
        rms = cand.pow(2).mean(1, keepdim=True).sqrt()
        new = cand + _RESEED_NOISE * rms * noise.to(x.device)

        self.embedding[dead] = new.to(self.embedding.dtype)
        self.ema_sum[dead] = new.to(self.ema_sum.dtype)  # = vector x ema_count (1)
        self.ema_count[dead] = 1.0
        return dead

    # ------------------------------------------------------------------ forward

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise the valid positions of v.

        v (B, N, d) features, mask (B, N) bool (True = valid). In training mode the dictionary is
        updated from the valid vectors (after they are quantised with the pre-update entries).
        Returns q (B, N, d) straight-through quantised (q = v at padding) and idx (B, N) long,
        -1 at padding.
        """
        flat = v.detach()[mask]  # (M, d)
        idx_valid = self.assign(flat)
        step = self.embedding[idx_valid].to(v.dtype)  # a copy: the pre-update entries
        if self.training:
            self.update(flat, idx_valid)
        # The forward value is the embedding, the gradient is the identity (the backbone learns
        # as if the quantiser were not there): q = v + stopgrad(e - v), and q = v at padding.
        # Built in place so that at most two (B, N, d) copies are alive at once.
        step.sub_(flat)
        del flat
        delta = torch.zeros_like(v)
        delta[mask] = step
        del step
        q = v + delta
        idx = torch.full(mask.shape, -1, dtype=torch.long, device=v.device)
        idx[mask] = idx_valid
        return q, idx

    # ------------------------------------------------------------------ logging

    @torch.no_grad()
    def usage_stats(self) -> dict[str, float]:
        """Usage over the updates since the last call, then reset the window.

        vd_usage: fraction of the K entries assigned at least once; vd_perplexity:
        exp(entropy) of the assignment distribution (K = uniform use, 1 = one entry).
        Both are 0.0 when no update happened in the window.
        """
        counts = self.window_counts.clone()
        self.window_counts.zero_()
        total = counts.sum()
        if total <= 0:
            return {"vd_usage": 0.0, "vd_perplexity": 0.0}
        p = counts[counts > 0] / total
        entropy = -(p * p.log()).sum()
        return {"vd_usage": float((counts > 0).double().mean()), "vd_perplexity": float(math.exp(entropy))}


class DictionaryGate(nn.Module):
    """The release's learned mix of quantised and raw features.

    A linear layer on q, then per position a 2-way softmax over a linear map of [q'; v]
    (the release's 1x1 conv, here on flattened tokens): out = g0 * q' + g1 * v.
    q, v (B, N, d) -> (B, N, d).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, 2)

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.proj(q)
        g = self.gate(torch.cat([q, v], -1)).softmax(-1)
        return g[..., :1] * q + g[..., 1:] * v
