"""The speed benchmarks run (at miniature sizes) and print their JSON line; the shortcuts that make
SOHO fast, and the one that keeps the region-based baseline fair, change no numbers."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _smoke(script: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    run = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2, run.stdout  # a description of the run, then the figures
    return json.loads(lines[-1])


FACTS = {"benchmark", "machine", "threads", "torch", "load_avg_1m"}


def test_inference_benchmark_smoke():
    out = _smoke("inference.py")
    assert FACTS | {"batch", "image_hw", "ms", "gflops", "speedup", "flop_ratio", "gflops_per_s",
                    "region_stage_ms", "rpn_padded_calls"} <= set(out)
    assert out["benchmark"] == "inference" and out["batch"] == 1
    assert {"soho_tiny", "region_r101c4_4boxes_tiny", "torchvision_fasterrcnn_r50_fpn"} <= set(out["ms"])
    assert all(v > 0 for v in out["ms"].values())
    # The detector pipeline does far more work than SOHO's, even at this size.
    assert out["flop_ratio"] > 1 and out["speedup"] > 0


def test_train_step_benchmark_smoke():
    out = _smoke("train_step.py")
    assert FACTS | {"step_s", "flops_per_step", "peak_gflops", "mfu", "conv_peak_gflops", "mfu_vs_best_peak",
                    "vd_share", "reference_step_s", "speedup_vs_reference", "release_like_step_s",
                    "speedup_vs_release_like"} <= set(out)
    assert out["step_s"] > 0 and out["flops_per_step"] > 0 and 0 < out["mfu"]
    assert 0 <= out["vd_share"] < 1
    # The release's extra work (visual path per caption, vocabulary over every position) is counted.
    assert out["release_like_flops_per_step"] > out["flops_per_step"]


def test_frozen_cnn_benchmark_smoke():
    out = _smoke("frozen_cnn.py")
    assert FACTS | {"step_s_uncached", "step_s_cached", "cache_speedup", "loss_equal"} <= set(out)
    assert out["step_s_uncached"] > 0 and out["step_s_cached"] > 0
    # The cached step found its images in the cache and computed the same loss.
    assert out["loss_equal"] and out["cache_hits"] > 0


def test_fusion_packing_benchmark_smoke():
    out = _smoke("fusion_packing.py")
    assert FACTS | {"real_token_share", "step_s_padded", "step_s_packed", "packing_speedup"} <= set(out)
    assert 0 < out["real_token_share"] < 1 and out["step_s_padded"] > 0 and out["step_s_packed"] > 0
    assert out["max_abs_diff"] < 1e-4  # the same layers computed the same outputs at the real positions


def test_dictionary_benchmark_smoke():
    out = _smoke("dictionary.py")
    assert FACTS | {"entries", "dim", "chunk_rows", "cases", "largest_peak_below_n_by_k"} <= set(out)
    assert [c["vectors"] for c in out["cases"]] == [64, 2000]
    assert all(c["ms"] > 0 and c["peak_mb"] > 0 for c in out["cases"])


def test_data_loader_benchmark_runs_and_prints_its_ratios():
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    run = subprocess.run([sys.executable, str(BENCH / "data_loader.py"), "--images", "60", "--seconds", "0.3",
                          "--rounds", "1", "--train-steps", "0"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"benchmark", "machine", "threads", "raw_decode_per_s", "loader_per_s", "loader_over_raw",
            "meets_target", "worker_ms_per_sample"} <= set(out)
    assert set(out["loader_over_raw"]) == {"local_w0", "local_w2", "s3_w0", "s3_w2"}
    assert all(r > 0 for r in out["loader_over_raw"].values())
    assert set(out["worker_ms_per_sample"]) == {"read_tar", "decode", "collate"}
    assert all(ms > 0 for ms in out["worker_ms_per_sample"].values())
    assert "x raw" in run.stdout  # the ratios are printed for a person too


def _load_inference_module():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_vectorised_class_nms_matches_batched_nms():
    """The baseline's per-class NMS (all classes at once over shared proposals) gives exactly
    what torchvision's batched_nms gives over every (proposal, class) pair."""
    bench = _load_inference_module()
    g = torch.Generator().manual_seed(0)
    for proposals, classes in ((40, 30), (120, 200)):
        corner = torch.rand(proposals, 2, generator=g) * 300
        boxes = torch.cat([corner, corner + torch.rand(proposals, 2, generator=g) * 150 + 5], 1)
        probs = torch.randn(proposals, classes + 1, generator=g).mul(3).softmax(1)[:, 1:]
        for iou in (0.3, 0.7):
            assert_close(bench.best_surviving_score(boxes, probs, iou),
                         bench.best_surviving_score_reference(boxes, probs, iou), rtol=0, atol=0)


def test_packed_fusion_equals_transformers_encoder_over_the_padded_layout():
    """The fusion runs its linear maps on the real tokens only: at every real position its output,
    and every gradient, are those of transformers' BertEncoder over the padded layout (what it ran
    before); padding positions are zero, also where ``rows`` selects one."""
    from soho_core.config import tiny
    from soho_core.models import SohoModel
    from soho_core.models.fusion import VISUAL_TYPE

    torch.manual_seed(0)
    model = SohoModel(tiny().model, vocab_size=100).eval()
    fusion = model.fusion
    t, length, n, d = 6, 10, 8, model.dim
    ids = torch.randint(5, 100, (t, length))
    text_mask = torch.ones(t, length, dtype=torch.long)
    for i, real in enumerate([10, 3, 7, 10, 5, 1]):
        text_mask[i, real:] = 0
    visual = torch.randn(t, n, d, requires_grad=True)
    visual_mask = torch.ones(t, n, dtype=torch.bool)
    visual_mask[2, 5:] = visual_mask[4, 1:] = False
    real = torch.cat([text_mask.bool(), visual_mask], 1)

    emb = fusion.bert.embeddings
    x = torch.cat([emb(input_ids=ids), visual + emb.token_type_embeddings.weight[VISUAL_TYPE]], 1)
    bias = (~real)[:, None, None, :].float() * torch.finfo(torch.float32).min
    reference = fusion.bert.encoder(x, attention_mask=bias).last_hidden_state[real]
    out = fusion(ids, text_mask, visual, visual_mask)
    assert_close(out[real], reference, rtol=1e-5, atol=1e-5)
    assert out[~real].abs().max() == 0
    params = [visual, *fusion.parameters()]
    g_ref = torch.autograd.grad(reference.pow(2).sum(), params, allow_unused=True)
    g_out = torch.autograd.grad(out[real].pow(2).sum(), params, allow_unused=True)
    for a, b in zip(g_ref, g_out):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(b, a, rtol=1e-4, atol=1e-5)

    rows = real.clone()
    rows[1, length - 1] = True  # a padding position: its output is zero, as in the full output
    part = fusion(ids, text_mask, visual, visual_mask, rows=rows)
    assert_close(part, fusion(ids, text_mask, visual, visual_mask)[rows], rtol=1e-5, atol=1e-5)


def test_fusion_last_layer_at_rows_equals_full_output():
    """FusionEncoder(rows=...) (the last layer only where a head reads) == full output [rows],
    values and gradients."""
    from soho_core.config import tiny
    from soho_core.models import SohoModel

    torch.manual_seed(0)
    model = SohoModel(tiny().model, vocab_size=100).eval()
    t, length, n, d = 5, 9, 12, model.dim
    ids = torch.randint(5, 100, (t, length))
    text_mask = torch.ones(t, length, dtype=torch.long)
    text_mask[::2, -3:] = 0
    visual = torch.randn(t, n, d, requires_grad=True)
    visual_mask = torch.ones(t, n, dtype=torch.bool)
    visual_mask[1, -4:] = False
    rows = torch.rand(t, length + n, generator=torch.Generator().manual_seed(2)) < 0.25
    rows[:, 0] = True
    rows[3] = False  # a text none of whose outputs is read
    full = model.fusion(ids, text_mask, visual, visual_mask)[rows]
    part = model.fusion(ids, text_mask, visual, visual_mask, rows=rows)
    assert part.shape == (int(rows.sum()), d)
    assert_close(part, full, rtol=1e-5, atol=1e-5)
    params = [visual, *model.fusion.parameters()]
    g_full = torch.autograd.grad(full.pow(2).sum(), params, allow_unused=True)
    g_part = torch.autograd.grad(part.pow(2).sum(), params, allow_unused=True)
    for a, b in zip(g_full, g_part):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pretrain_forward_losses_and_gradients_unchanged_by_row_selection():
    """pretrain_forward reads its heads' rows from the last layer run at those rows only; the
    losses and every gradient equal those of the full last layer indexed afterwards."""
    from soho_core.config import tiny
    from soho_core.models import SohoModel
    from soho_core.models.fusion import FusionEncoder

    torch.manual_seed(0)
    cfg = tiny()
    model = SohoModel(cfg.model, vocab_size=100)  # tiny: dropout 0, so training mode is deterministic
    reference = copy.deepcopy(model)
    plain = FusionEncoder.forward

    def every_position(self, *args, rows=None):
        hidden = plain(self, *args)
        return hidden if rows is None else hidden[rows]

    reference.fusion.forward = every_position.__get__(reference.fusion)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (8, 10), generator=g)
    mlm = torch.full_like(ids, -100)
    mlm[:, 3] = ids[:, 3]
    batch = dict(images=torch.randn(2, 3, 64, 64, generator=g), image_sizes=torch.tensor([[64, 64], [64, 48]]),
                 input_ids=ids, attention_mask=torch.ones_like(ids), mlm_labels=mlm,
                 image_index=torch.arange(2).repeat_interleave(4), itm_labels=torch.tensor([1, 0] * 4))
    outs = []
    for m in (model, reference):
        m.train()
        torch.manual_seed(5)  # the same MVM draws
        out = m.pretrain_forward(**batch, mvm_prob=1.0)
        out.loss.backward()
        outs.append(out)
    assert outs[0].num_mvm == outs[1].num_mvm > 0
    for name in ("loss", "loss_mlm", "loss_mvm", "loss_itm", "loss_itc"):
        assert_close(getattr(outs[0], name), getattr(outs[1], name), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if a.grad is not None or b.grad is not None:
            # The tolerance follows each gradient's scale: the trainable stem's gradient reaches ~5,
            # summed over every pixel, where float rounding alone differs by ~4e-6.
            assert_close(a.grad, b.grad, rtol=1e-3, atol=max(1e-6, 1e-5 * float(b.grad.abs().max())), msg=name)


def test_optimizers_are_fused_on_cpu():
    from soho_core.config import tiny
    from soho_core.tasks.pretrain import PretrainModel
    from soho_core.train.optim import build_optimizers

    cfg = tiny()
    opts = build_optimizers(PretrainModel(cfg, 100), cfg.optim)
    assert len(opts) == 2 and all(o.defaults.get("fused") for o in opts)
