"""Visual entailment (SNLI-VE): does the image entail, contradict, or leave open the
hypothesis? A 3-way MLP on [CLS], cross-entropy; evaluated with ``accuracy``, against the
per-type majority label of the training split and the model with constant images
(:mod:`soho_core.tasks.baselines`).

    soho finetune --task ve --init PRETRAIN_RUN --data SHARDS --out RUN
    soho evaluate --task ve --checkpoint RUN --data SHARDS --out metrics.json
"""

from __future__ import annotations

import torch

from soho_core.tasks.base import EvalResult, StepOutput, Task, classification_output, evaluate_classifier
from soho_core.tasks.baselines import train_prior
from soho_core.tasks.single_image import GroupedCollator, SingleImageClassifier, grouped_loader

LABELS = ("entailment", "neutral", "contradiction")


def label_index(entry: dict) -> int:
    label = entry["label"]
    if label not in LABELS:
        raise ValueError(f"visual-entailment label {label!r} is not one of {LABELS}")
    return LABELS.index(label)


class VEModel(SingleImageClassifier):
    def forward(self, images, image_sizes, input_ids, attention_mask, image_index, targets) -> StepOutput:
        """targets (T,) long: index into LABELS."""
        logits = self.logits(images, image_sizes, input_ids, attention_mask, image_index)
        return classification_output(logits, targets, "loss_ve")


class VETask(Task):
    name = "ve"

    def build_model(self, cfg, vocab_size, meta) -> VEModel:
        return VEModel(cfg, vocab_size, len(LABELS))

    def collator(self, tokenizer, cfg, seed, train) -> GroupedCollator:
        return GroupedCollator(tokenizer, cfg, seed, train, "hypotheses", lambda e: e["hypothesis"],
                               label_index, lambda t: torch.tensor(t, dtype=torch.long))

    def loader(self, data_uri, split, cfg, tokenizer, seed, train):
        return grouped_loader(self.name, data_uri, split, cfg, seed, train,
                              self.collator(tokenizer, cfg, seed, train))

    def evaluate(self, model, data_uri, split, cfg, tokenizer, device) -> EvalResult:
        def describe(batch, row, pred, prob):
            entry = batch.entries[row]
            return {"image_id": batch.image_ids[int(batch.image_index[row])], "hypothesis": entry["hypothesis"],
                    "prediction": LABELS[pred], "probability": prob, "label": entry["label"]}

        batches = self.loader(data_uri, split, cfg, tokenizer, cfg.train.seed, train=False)
        return evaluate_classifier(model, batches, device, describe, task=self.name,
                                   prior=train_prior(data_uri, self.name, "hypotheses", label_index),
                                   blind=cfg.finetune.eval_blind)
