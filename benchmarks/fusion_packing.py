"""The fusion encoder's forward + backward with its linear maps on the real tokens alone (packed)
against the same layers over the padded layout (transformers' BertEncoder, what it ran before).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fusion_packing.py                 # the demo
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fusion_packing.py --threads 1     # a local lane
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fusion_packing.py --preset res18 --visual 600 --visual-valid 0.7
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fusion_packing.py --smoke         # seconds, for tests

The batch is a VQA batch as the collator makes it: ``--texts`` questions, each padded to the
batch's longest, of lengths drawn evenly from ``--text-min`` to ``--text-max`` word pieces (the
demo world's questions: 5 to 15, mean 8.6), each with its image's ``--visual`` tokens, of which
the share ``--visual-valid`` is real (images of several shapes padded to the batch's largest).
The weights are the preset's, random. Both ways run the same layers on the same inputs, timed in
alternating rounds.

Figures (the JSON line):
  real_token_share  real tokens / positions of the padded layout
  step_s_padded     median seconds of forward + backward over the padded layout
  step_s_packed     the same with the linear maps on the real tokens only
  packing_speedup   step_s_padded / step_s_packed
  max_abs_diff      largest difference of the two outputs at the real positions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, emit, interleaved, say, setup  # noqa: E402

from soho_core.config import load_config  # noqa: E402
from soho_core.models.fusion import VISUAL_TYPE, FusionEncoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--text-min", type=int, default=5)
    p.add_argument("--text-max", type=int, default=15)
    p.add_argument("--visual", type=int, default=16, help="visual tokens per image, padded")
    p.add_argument("--visual-valid", type=float, default=1.0, help="the share of them that is real, on average")
    add_run_options(p, warmup=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.texts, args.visual, args.iters, args.warmup = "tiny", 8, 8, 1, 0
    if not 1 <= args.text_min <= args.text_max:
        p.error(f"--text-min {args.text_min} / --text-max {args.text_max}: need 1 <= min <= max")

    facts = setup(args.threads)
    cfg = load_config(args.preset, ["model.fusion.bert=", "model.fusion.dropout=0"])
    vocab = 1000
    fusion = FusionEncoder(cfg.model.fusion, vocab).train()
    g = torch.Generator().manual_seed(0)
    t, d = args.texts, fusion.hidden_size
    lengths = torch.randint(args.text_min, args.text_max + 1, (t,), generator=g)
    lengths[0] = args.text_max  # the batch is padded to its longest
    ids = torch.randint(5, vocab, (t, args.text_max), generator=g)
    text_mask = (torch.arange(args.text_max)[None, :] < lengths[:, None]).long()
    valid = (torch.rand(t, generator=g) * 2 * (1 - args.visual_valid) + args.visual_valid).clamp(max=1)
    keep = (valid * args.visual).round().clamp(min=1)
    keep[0] = args.visual
    visual_mask = torch.arange(args.visual)[None, :] < keep[:, None]
    visual = torch.randn(t, args.visual, d, generator=g)
    real = torch.cat([text_mask.bool(), visual_mask], 1)

    def padded() -> torch.Tensor:
        emb = fusion.bert.embeddings
        x = torch.cat([emb(input_ids=ids), visual + emb.token_type_embeddings.weight[VISUAL_TYPE]], 1)
        bias = (~real)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        return fusion.bert.encoder(x, attention_mask=bias).last_hidden_state

    def packed() -> torch.Tensor:
        return fusion(ids, text_mask, visual, visual_mask)

    def step(forward):
        def run() -> None:
            fusion.zero_grad(set_to_none=True)
            forward().pow(2).mean().backward()
        return run

    with torch.no_grad():
        diff = float((padded() - packed())[real].abs().max())
    share = float(real.float().mean())
    say(f"fusion_packing: {facts['machine']}, {facts['threads']} threads, torch {facts['torch']}, "
        f"load average {facts['load_avg_1m']}",
        f"  preset {args.preset} (width {d}, {fusion.num_layers} layers, random weights), {t} texts of "
        f"{args.text_min}-{args.text_max} word pieces, {args.visual} visual tokens ({args.visual_valid:.0%} real): "
        f"{share:.0%} of the padded positions are real")
    times = interleaved({"padded": step(padded), "packed": step(packed)}, args.iters, args.warmup)
    say(f"  forward + backward: padded {times['padded'] * 1e3:.1f} ms, packed {times['packed'] * 1e3:.1f} ms "
        f"({times['padded'] / times['packed']:.2f}x); outputs differ by at most {diff:.1e}")
    emit({"benchmark": "fusion_packing", **facts, "preset": args.preset, "texts": t, "text_min": args.text_min, "text_max": args.text_max,
          "visual": args.visual, "real_token_share": round(share, 3),
          "step_s_padded": round(times["padded"], 5), "step_s_packed": round(times["packed"], 5),
          "packing_speedup": round(times["padded"] / times["packed"], 3), "max_abs_diff": diff}, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
