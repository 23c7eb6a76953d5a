"""The visual dictionary's cost: time and peak memory of one training-mode forward (nearest-entry
search, straight-through quantisation, EMA update, re-seeding) at several numbers of vectors.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/dictionary.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/dictionary.py --smoke   # seconds, for tests

The nearest-entry search must not build the N x K distance matrix: it works through row chunks
of at most ``_CHUNK_ELEMENTS`` distances, so its peak memory is bounded whatever N is. The
cases: the res18 pre-training batch (4 images at 384x640, a 6x10 grid: N = 240), 64 images of
600x1000 (a 10x16 grid: N = 10,240) and N = 65,536. For each, ``peak_mb`` (the profiler's CPU
allocations replayed in order, on top of what was live before) is set against ``n_by_k_mb``,
what one N x K fp32 distance matrix alone would take. The dictionary's share of a training
step (``vd_share``) is measured by benchmarks/train_step.py, inside the real step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, emit, median_time, peak_cpu_memory, say, setup  # noqa: E402

from soho_core.config import load_config  # noqa: E402
from soho_core.models.visual_dictionary import _CHUNK_ELEMENTS, VisualDictionary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="res18", help="dictionary size and width come from this preset")
    p.add_argument("--vectors", default="240,10240,65536", help="N values to measure")
    add_run_options(p, warmup=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.vectors, args.iters, args.warmup = "tiny", "64,2000", 1, 0

    facts = setup(args.threads)
    cfg = load_config(args.preset)
    k = cfg.model.dictionary.size
    dim = 64 if args.preset == "tiny" else cfg.model.fusion.hidden_size
    vd = VisualDictionary(cfg.model.dictionary, dim).train()
    chunk_rows = max(1, _CHUNK_ELEMENTS // k)
    say(f"dictionary: {facts['machine']}, {facts['threads']} threads, torch {facts['torch']}, "
        f"load average {facts['load_avg_1m']}",
        f"  preset {args.preset}: K = {k} entries of width {dim}, fp32, training mode (EMA update on); "
        f"search chunk {chunk_rows} rows x {k} = {chunk_rows * k * 4 / 2**20:.0f} MB")

    cases: list[dict[str, Any]] = []
    for n in (int(v) for v in args.vectors.split(",") if v):
        v = torch.randn(1, n, dim)
        mask = torch.ones(1, n, dtype=torch.bool)

        def forward() -> None:
            vd(v, mask)

        seconds = median_time(forward, args.iters, args.warmup)
        peak = peak_cpu_memory(forward)
        case = {"vectors": n, "ms": round(seconds * 1e3, 2), "peak_mb": round(peak / 2**20, 2),
                "n_by_k_mb": round(n * k * 4 / 2**20, 2), "inputs_mb": round(n * dim * 4 / 2**20, 2),
                "us_per_vector": round(seconds * 1e6 / n, 3)}
        cases.append(case)
        say(f"  N = {n:>6}: {case['ms']:8.2f} ms, peak {case['peak_mb']:7.1f} MB "
            f"(an N x K matrix alone: {case['n_by_k_mb']:.1f} MB; the inputs: {case['inputs_mb']:.1f} MB)")
    emit({"benchmark": "dictionary", "preset": args.preset, **facts, "entries": k, "dim": dim,
          "chunk_rows": chunk_rows, "chunk_mb": round(chunk_rows * k * 4 / 2**20, 2), "iters": args.iters,
          "cases": cases,
          # At the largest N the whole forward peaks below what the N x K matrix alone would take.
          "largest_peak_below_n_by_k": cases[-1]["peak_mb"] < cases[-1]["n_by_k_mb"]}, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
