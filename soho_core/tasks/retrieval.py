"""Image-text retrieval (COCO / Flickr30K): the pre-trained ITM head ranks the candidates.

Fine-tuning trains two scores at once (ALBEF's recipe on the SOHO trunk):

* ITC, a cheap similarity: the mean of an image's valid visual tokens and the [CLS] of a
  text-only pass, each through a linear projection and L2-normalised; InfoNCE both ways over
  the batch, every caption of an image a positive for it;
* ITM, the fusion [CLS] through the pre-training head, against one hard negative caption and
  one hard negative image per positive pair, drawn in proportion to the ITC similarity.

Evaluation ranks every image against every caption in two modes, both reported:

* exact: the ITM probability of all I x T pairs (the spec's metric, under the plain names);
* two-stage: ITC for all pairs, then ITM re-ranks the top ``finetune.shortlist_k`` candidates
  of each query; the rest follow in ITC order below them (names prefixed ``two_stage_``).
  With ``finetune.retrieval_exact=false`` the exact mode is skipped (its cost grows with
  I x T: 25 million pairs on COCO's 5k test) and the two-stage recalls take the plain names.

Beside them (:mod:`soho_core.tasks.baselines`): chance-level recall as the text prior, and the
exact mode with every image replaced by a constant one (:func:`blind_match`; as cheap as
scoring one image per distinct image size), broken down by direction.

Either way the CNN runs once per image: its tokens are kept and gathered for each pair.

    soho finetune --task retrieval --init PRETRAIN_RUN --data SHARDS --out RUN
    soho evaluate --task retrieval --checkpoint RUN --data SHARDS --out metrics.json
    python benchmarks/retrieval.py --images 200        # exact vs two-stage, time and recall
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from soho_core.config import SohoConfig
from soho_core.data.loader import stream
from soho_core.data.transforms import pad_batch
from soho_core.models.heads import ITCHead
from soho_core.models.soho import cls_rows
from soho_core.tasks.base import EvalResult, StepOutput, Task, TaskModel, mean_stat
from soho_core.tasks.baselines import BLIND, PRIOR, constant_images
from soho_core.tasks.metrics import chance_recall, retrieval_metrics
from soho_core.tasks.single_image import GroupedBatch, GroupedCollator, task_trunk

EMBED_DIM = 256  # width of the ITC space (ALBEF's)
PAIR_BATCH = 256  # (image, text) pairs per fusion pass in evaluation
# A candidate outside the shortlist scores its ITC cosine minus this: always in [-4, -2], so
# below every ITM probability in [0, 1], and still in ITC order among the others.
OUTSIDE = 3.0
TXT_KEYS, IMG_KEYS = ("txt_r1", "txt_r5", "txt_r10"), ("img_r1", "img_r5", "img_r10")


@dataclass
class ImageFeatures:
    """What evaluation keeps per image. tokens (I, N, d) visual tokens; mask (I, N) bool, True =
    valid (images of other batches are padded along N: positions live in the tokens themselves,
    so order and padding along N mean nothing to the fusion encoder); embeds (I, E) unit ITC
    embeddings."""

    tokens: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor


class RetrievalModel(TaskModel):
    """Trunk with its pre-trained ITM head, plus the ITC head: the pre-trained one where the trunk
    has it (``model.itc_dim`` > 0), else a new one."""

    def __init__(self, cfg: SohoConfig, vocab_size: int):
        super().__init__()
        self.trunk = task_trunk(cfg, vocab_size, keep_itm=True, keep_itc=True)
        self.new_itc = ITCHead(self.trunk.dim, EMBED_DIM) if self.trunk.itc_head is None else None
        self.temperature = cfg.finetune.itc_temperature

    @property
    def itc(self) -> ITCHead:
        return self.trunk.itc_head if self.new_itc is None else self.new_itc

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.new_itc.parameters()) if self.new_itc is not None else []

    def encode_images(self, images: torch.Tensor, image_sizes: torch.Tensor) -> ImageFeatures:
        """images (B, 3, H, W), image_sizes (B, 2): the one CNN pass per image."""
        visual = self.trunk.encode_images(images, image_sizes)
        return ImageFeatures(visual.tokens, visual.mask, self.itc.embed_image(self.trunk.pool(visual)))

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, L) -> (T, E) unit ITC embeddings from the [CLS] of a text-only pass."""
        return self.itc.embed_text(self.trunk.text_cls(input_ids, attention_mask))

    def match_logits(self, input_ids, attention_mask, tokens, mask) -> torch.Tensor:
        """Pairs already gathered: (P, L) text, (P, N, d) tokens, (P, N) mask -> (P, 2) ITM logits.
        The fusion's last layer runs at [CLS] alone, the only position the head reads."""
        rows = cls_rows(input_ids.shape[0], input_ids.shape[1] + mask.shape[1], input_ids.device)
        cls = self.trunk.fusion(input_ids, attention_mask, tokens, mask, rows=rows)
        return self.trunk.itm_head(cls).float()

    def match_probability(self, feats: ImageFeatures, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        """(P,) ITM match probability of the pairs (image_idx[p], text_idx[p]), PAIR_BATCH at a time,
        gathering the kept visual tokens (the CNN is not run)."""
        out = [feats.embeds.new_zeros(0)]
        for s in range(0, image_idx.numel(), PAIR_BATCH):
            i, t = image_idx[s:s + PAIR_BATCH], text_idx[s:s + PAIR_BATCH]
            logits = self.match_logits(input_ids[t], attention_mask[t], feats.tokens[i], feats.mask[i])
            out.append(logits.softmax(1)[:, 1])
        return torch.cat(out)

    def forward(self, images, image_sizes, input_ids, attention_mask, image_index, targets) -> StepOutput:
        """B images, T texts; image_index (T,) long; targets (T, B) bool: text t is one of image
        i's captions (its own image, or another with an identical caption)."""
        feats = self.encode_images(images, image_sizes)
        texts = self.embed_texts(input_ids, attention_mask)
        match = targets.t()  # (B, T)
        loss_itc, acc_itc, logits = self.itc.loss(feats.embeds, texts, match, self.temperature)  # logits (B, T)

        # Pairs for ITM: the T positives, a hard caption for each one's image, a hard image for
        # each caption. A row without any non-matching candidate keeps a placeholder pair at
        # weight 0, so the shapes never depend on the data (no host sync).
        neg_text, has_text, neg_image, has_image = hard_negatives(logits.detach(), match, image_index)
        every = torch.arange(texts.shape[0], device=texts.device)
        image_idx = torch.cat([image_index, image_index, neg_image])
        text_idx = torch.cat([every, neg_text, every])
        labels = torch.cat([torch.ones_like(every), torch.zeros_like(every), torch.zeros_like(every)])
        weight = torch.cat([torch.ones_like(has_text), has_text, has_image]).float()
        itm = self.match_logits(input_ids[text_idx], attention_mask[text_idx],
                                feats.tokens[image_idx], feats.mask[image_idx])
        loss_itm = (F.cross_entropy(itm, labels, reduction="none") * weight).sum() / weight.sum()
        acc_itm = ((itm.detach().argmax(1) == labels).float() * weight).sum() / weight.sum()
        return StepOutput(loss_itc + loss_itm, {
            "loss_itc": mean_stat(loss_itc), "loss_itm": mean_stat(loss_itm), "acc_itm": mean_stat(acc_itm),
            "acc_itc": mean_stat(acc_itc), "hard_negatives": mean_stat(weight[len(every):].mean())})


def _draw(logits: torch.Tensor, excluded: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row with probability softmax(logits) over the columns not excluded.
    Returns (pick (R,) long, found (R,) bool); rows with no allowed column pick at random."""
    found = (~excluded).any(1)
    probs = logits.float().masked_fill(excluded, float("-inf")).softmax(1)
    probs = torch.where(found[:, None], probs, torch.ones_like(probs))  # all-excluded rows are NaN
    return torch.multinomial(probs, 1, generator=generator).squeeze(1), found


@torch.no_grad()
def hard_negatives(logits: torch.Tensor, match: torch.Tensor, image_index: torch.Tensor, generator=None):
    """Hard negatives for the T positive pairs (image_index[t], t), from ITC logits (B, T).

    neg_text[t]: a caption for image image_index[t], drawn with probability softmax of that
    image's row over the texts that do not match it; neg_image[t]: an image for text t, drawn
    likewise over its column. Returns (neg_text, has_text, neg_image, has_image), each (T,);
    has_* is False where every candidate matches (the pick is then meaningless).
    """
    neg_text, has_text = _draw(logits[image_index], match[image_index], generator)
    neg_image, has_image = _draw(logits.t(), match.t(), generator)
    return neg_text, has_text, neg_image, has_image


def shortlist(sim: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Bool mask of the top min(k, size) entries of ``sim`` along ``dim`` (per query)."""
    top = sim.topk(min(k, sim.shape[dim]), dim=dim).indices
    return torch.zeros_like(sim, dtype=torch.bool).scatter_(dim, top, True)


def rerank(model: RetrievalModel, feats: ImageFeatures, input_ids, attention_mask, sim: torch.Tensor,
           candidates: torch.Tensor) -> torch.Tensor:
    """(I, T) scores: the ITM probability where ``candidates`` (I, T) bool, ITC cosine - OUTSIDE
    elsewhere. Each candidate pair goes through the fusion encoder once."""
    image_idx, text_idx = candidates.nonzero(as_tuple=True)
    scores = sim - OUTSIDE
    scores[image_idx, text_idx] = model.match_probability(feats, input_ids, attention_mask, image_idx, text_idx)
    return scores


@torch.no_grad()
def blind_match(model: RetrievalModel, image_sizes: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """(I, T) exact-mode ITM probabilities with each of the I images (valid sizes (I, 2)) replaced
    by a constant image of its size: the model's own text prior.

    A constant image's features depend only on its size, so one image per distinct size is
    encoded and scored against every text (S x T pairs instead of I x T; S = 1 when all images
    have one size) and its row is shared by the images of that size. Each is padded to
    ``size_divisor`` alone, where a real image is padded to its batch's largest: with sizes
    that differ the tokens at a blind image's border may differ a little from that."""
    device = input_ids.device
    sizes, inverse = torch.unique(image_sizes.cpu(), dim=0, return_inverse=True)
    parts = []
    for h, w in sizes.tolist():
        images, valid = pad_batch([torch.zeros(3, h, w, dtype=torch.uint8)], size_divisor)
        parts.append(model.encode_images(constant_images(images, valid).to(device), valid.to(device)))
    num_sizes, num_texts = len(parts), input_ids.shape[0]
    pairs = torch.ones(num_sizes, num_texts, dtype=torch.bool, device=device).nonzero(as_tuple=True)
    probs = model.match_probability(_stack(parts), input_ids, attention_mask, *pairs).view(num_sizes, num_texts)
    return probs[inverse.to(device)]


def by_direction(recalls: dict[str, float]) -> dict[str, float]:
    """Recalls (``retrieval_metrics`` keys) -> the mean R@{1,5,10} of each direction."""
    return {"image->text": sum(recalls[k] for k in TXT_KEYS) / len(TXT_KEYS),
            "text->image": sum(recalls[k] for k in IMG_KEYS) / len(IMG_KEYS)}


def _stack(parts: list[ImageFeatures]) -> ImageFeatures:
    """Concatenate per-batch features, padding N with masked zero tokens."""
    n = max(p.tokens.shape[1] for p in parts)
    return ImageFeatures(torch.cat([F.pad(p.tokens, (0, 0, 0, n - p.tokens.shape[1])) for p in parts]),
                         torch.cat([F.pad(p.mask, (0, n - p.mask.shape[1])) for p in parts]),
                         torch.cat([p.embeds for p in parts]))


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def rank_images(model: RetrievalModel, images: list[torch.Tensor], text: str, tokenizer, cfg: SohoConfig,
                top_k: int = 5) -> list[tuple[int, float]]:
    """The two-stage ranking of ``images`` (uint8 (3, h, w), as ``decode_image`` returns them)
    for one caption: [(index, score)] best first, at most ``top_k``. Scores in [0, 1] are ITM
    match probabilities of the ``finetune.shortlist_k`` ITC-nearest images; any further image
    follows with its ITC cosine - 3. ``model`` in eval mode."""
    if not images:
        raise ValueError("rank_images needs at least one image")
    device = next(model.parameters()).device
    step = cfg.data.images_per_batch
    feats = _stack([model.encode_images(*(x.to(device) for x in pad_batch(images[s:s + step], cfg.data.size_divisor)))
                    for s in range(0, len(images), step)])
    enc = tokenizer([text], truncation=True, max_length=cfg.model.fusion.max_text_len, return_tensors="pt")
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    sim = feats.embeds @ model.embed_texts(ids, attn).t()  # (I, 1)
    near = shortlist(sim, cfg.finetune.shortlist_k, dim=0)
    scores = rerank(model, feats, ids, attn, sim, near)[:, 0]
    order = scores.argsort(descending=True)[:top_k]
    return [(int(i), float(scores[i])) for i in order]


class RetrievalCollator(GroupedCollator):
    """Captions are plain strings in the shards: they become {"id", "caption"} entries, and
    ``targets`` the (T, B) bool match table against ALL of each image's captions, so a caption
    that two images share is never a negative for either."""

    def __init__(self, tokenizer, cfg: SohoConfig, seed: int, train: bool):
        super().__init__(tokenizer, cfg, seed, train, "captions", lambda e: e["caption"], lambda e: 0,
                         lambda t: torch.zeros(len(t)))

    def __call__(self, samples, counter) -> GroupedBatch:
        entries = [{**s, "record": {**s["record"], "captions": [
            {"id": f"{s['record'].get('image_id', s['key'])}-c{k}", "caption": c}
            for k, c in enumerate(s["record"]["captions"])]}} for s in samples]
        batch = super().__call__(entries, counter)
        own = [set(s["record"]["captions"]) for s in samples]
        batch.targets = torch.tensor([[e["caption"] in caps for caps in own] for e in batch.entries], dtype=torch.bool)
        return batch


def _check(sample) -> None:
    captions = sample["record"].get("captions")
    if not captions or not all(isinstance(c, str) and c for c in captions):
        raise ValueError("no captions (a non-empty list of non-empty strings)")


class RetrievalTask(Task):
    name = "retrieval"

    def build_model(self, cfg, vocab_size, meta) -> RetrievalModel:
        return RetrievalModel(cfg, vocab_size)

    def loader(self, data_uri, split, cfg, tokenizer, seed, train):
        return stream(data_uri, self.name, split, cfg, seed, train, RetrievalCollator(tokenizer, cfg, seed, train),
                      check=_check)

    @torch.no_grad()
    def evaluate(self, model, data_uri, split, cfg, tokenizer, device) -> EvalResult:
        """The first ``finetune.eval_max_images`` images of ``split`` (0 = all) with all their
        captions. ``*_seconds`` time the scoring of each mode (``blind_seconds`` the constant-image
        pass); ``encode_seconds`` what all share: reading the split and the one visual pass per image."""
        limit, parts, ids, attn, owner, image_ids, captions = cfg.finetune.eval_max_images, [], [], [], [], [], []
        sizes = []
        t0 = _clock(device)
        for batch in self.loader(data_uri, split, cfg, tokenizer, cfg.train.seed, False):
            take = batch.images.shape[0] if not limit else min(batch.images.shape[0], limit - len(image_ids))
            if take <= 0:
                break
            keep = batch.image_index < take
            parts.append(model.encode_images(batch.images[:take].to(device), batch.image_sizes[:take].to(device)))
            sizes.append(batch.image_sizes[:take])
            ids += list(batch.input_ids[keep].to(device))
            attn += list(batch.attention_mask[keep].to(device))
            owner.append(batch.image_index[keep] + len(image_ids))
            captions += [e["caption"] for e, k in zip(batch.entries, keep.tolist()) if k]
            image_ids += batch.image_ids[:take]
        if not parts:
            raise ValueError(f"no {self.name} images in split {split!r} of {data_uri}")
        feats = _stack(parts)
        input_ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id)
        attention_mask = nn.utils.rnn.pad_sequence(attn, batch_first=True, padding_value=0)
        owner_t = torch.cat(owner).to(device)
        num_images, num_texts = len(image_ids), len(captions)
        t1 = _clock(device)

        exact = None
        if cfg.finetune.retrieval_exact:
            every = torch.ones(num_images, num_texts, dtype=torch.bool, device=device)
            exact = model.match_probability(feats, input_ids, attention_mask, *every.nonzero(as_tuple=True))
            exact = exact.view(num_images, num_texts)
        t2 = _clock(device)

        texts = torch.cat([model.embed_texts(input_ids[s:s + PAIR_BATCH], attention_mask[s:s + PAIR_BATCH])
                           for s in range(0, num_texts, PAIR_BATCH)])
        sim = feats.embeds @ texts.t()  # (I, T) cosine
        per_image = shortlist(sim, cfg.finetune.shortlist_k, dim=1)  # text retrieval: texts per image
        per_text = shortlist(sim, cfg.finetune.shortlist_k, dim=0)  # image retrieval: images per text
        candidates = per_image | per_text
        scored = rerank(model, feats, input_ids, attention_mask, sim, candidates)
        below = sim - OUTSIDE
        by_image, by_text = torch.where(per_image, scored, below), torch.where(per_text, scored, below)
        t3 = _clock(device)

        blind = None
        if cfg.finetune.eval_blind:
            blind = retrieval_metrics(blind_match(model, torch.cat(sizes), input_ids, attention_mask,
                                                  cfg.data.size_divisor), owner_t)
        t4 = _clock(device)

        txt, img = retrieval_metrics(by_image, owner_t), retrieval_metrics(by_text, owner_t)
        two = {**{k: txt[k] for k in TXT_KEYS}, **{k: img[k] for k in IMG_KEYS}}
        two["r_mean"] = sum(two.values()) / len(two)
        if exact is not None:
            metrics = retrieval_metrics(exact, owner_t)
            metrics.update({f"two_stage_{k}": v for k, v in two.items()})
        else:  # finetune.retrieval_exact=false: the two-stage ranking is the result, under the plain names
            metrics = dict(two)
        metrics.update({"exact_seconds": t2 - t1, "two_stage_seconds": t3 - t2, "encode_seconds": t1 - t0,
                        "blind_seconds": t4 - t3,
                        "pairs_scored_exact": num_images * num_texts if exact is not None else 0,
                        "pairs_scored_two_stage": int(candidates.sum()), "num_images": num_images,
                        "shortlist_k": cfg.finetune.shortlist_k})

        samples = []
        ranked = exact if exact is not None else by_text
        for t in [int((owner_t == i).nonzero()[0]) for i in range(min(3, num_images))]:  # first captions
            top = ranked[:, t].topk(min(3, num_images))
            samples.append({"caption": captions[t], "image_id": image_ids[int(owner_t[t])], "top_images": [
                {"image_id": image_ids[i], "score": round(float(s), 4), "correct": i == int(owner_t[t])}
                for s, i in zip(top.values.tolist(), top.indices.tolist())]})
        result = EvalResult(num_texts, metrics, samples, primary="r_mean")
        columns = {"metric": metrics, PRIOR: chance_recall(owner_t, num_images), BLIND: blind}
        columns = {name: recalls for name, recalls in columns.items() if recalls is not None}
        result.baselines = {name: {k: recalls[k] for k in (*TXT_KEYS, *IMG_KEYS, "r_mean")}
                            for name, recalls in columns.items() if name != "metric"}
        directions = {name: by_direction(recalls) for name, recalls in columns.items()}
        result.breakdown = {d: {"n": n, **{name: means[d] for name, means in directions.items()}}
                            for d, n in (("image->text", num_images), ("text->image", num_texts))}
        return result
