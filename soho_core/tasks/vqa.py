"""VQA: an MLP on [CLS] over the answer vocabulary, trained with soft-target binary
cross-entropy; evaluated with VQA accuracy (``vqa_score``), against two blind baselines and
per question type (:mod:`soho_core.tasks.baselines`).

    soho finetune --task vqa --init PRETRAIN_RUN --data SHARDS --out RUN
    soho evaluate --task vqa --checkpoint RUN --data SHARDS --out metrics.json
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from soho_core.config import SohoConfig
from soho_core.data.shards import load_index
from soho_core.tasks.base import EvalResult, StepOutput, Task, mean_stat
from soho_core.tasks.baselines import (add_baselines, blind_inputs, majority_answer, text_type,
                                       train_prior)
from soho_core.tasks.metrics import vqa_score, vqa_scores, vqa_soft_targets
from soho_core.tasks.single_image import GroupedCollator, SingleImageClassifier, grouped_loader


class VQAModel(SingleImageClassifier):
    def forward(self, images, image_sizes, input_ids, attention_mask, image_index, targets) -> StepOutput:
        """targets (T, A) soft scores in [0, 1]."""
        logits = self.logits(images, image_sizes, input_ids, attention_mask, image_index)
        # Summed over answers, averaged over questions (the usual VQA scaling of the BCE).
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
        score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()
        return StepOutput(loss, {"loss_vqa": mean_stat(loss), "vqa_score": mean_stat(score)})


class VQATask(Task):
    name = "vqa"

    def metadata(self, data_uri: str, cfg: SohoConfig) -> dict[str, Any]:
        _, index = load_index(data_uri, self.name)
        vocab = (index.get("answer_vocab") or [])[: cfg.finetune.answer_vocab_size]
        if len(vocab) < 2:
            raise ValueError(f"{data_uri}/vqa/index.json has no answer vocabulary")
        return {"answer_vocab": vocab}

    def build_model(self, cfg, vocab_size, meta) -> VQAModel:
        model = VQAModel(cfg, vocab_size, len(meta["answer_vocab"]))
        model.answer_vocab = list(meta["answer_vocab"])
        return model

    def collator(self, tokenizer, cfg, seed, train, answer_vocab: list[str]) -> GroupedCollator:
        index = {a: i for i, a in enumerate(answer_vocab)}

        def stack(targets: list[dict[int, float]]) -> torch.Tensor:
            out = torch.zeros(len(targets), len(answer_vocab))
            for row, scores in enumerate(targets):
                for j, value in scores.items():
                    out[row, j] = value
            return out

        return GroupedCollator(tokenizer, cfg, seed, train, "questions", lambda e: e["question"],
                               lambda e: vqa_soft_targets(e["answers"], index), stack)

    def loader(self, data_uri, split, cfg, tokenizer, seed, train):
        vocab = self.metadata(data_uri, cfg)["answer_vocab"]
        return grouped_loader(self.name, data_uri, split, cfg, seed, train,
                              self.collator(tokenizer, cfg, seed, train, vocab))

    @torch.no_grad()
    def evaluate(self, model, data_uri, split, cfg, tokenizer, device) -> EvalResult:
        """VQA accuracy, and beside it the per-type majority answer of the training split and the
        model with constant images, each overall and per question type."""
        vocab = model.answer_vocab
        blind = cfg.finetune.eval_blind
        prior = train_prior(data_uri, self.name, "questions", lambda e: majority_answer(e["answers"]))
        collator = self.collator(tokenizer, cfg, cfg.train.seed, False, vocab)
        predictions, blind_predictions, answers, types, samples = [], [], [], [], []
        for batch in grouped_loader(self.name, data_uri, split, cfg, cfg.train.seed, False, collator):
            inputs = batch.to(device).model_inputs()
            inputs.pop("targets")
            probs = model.logits(**inputs).sigmoid()
            best = probs.argmax(1).tolist()
            if blind:
                blind_predictions += [vocab[j] for j in model.logits(**blind_inputs(inputs)).argmax(1).tolist()]
            for row, (entry, j) in enumerate(zip(batch.entries, best)):
                predictions.append(vocab[j])
                answers.append(entry["answers"])
                types.append(text_type(entry, self.name))
                if len(samples) < 8:
                    samples.append({"image_id": batch.image_ids[int(batch.image_index[row])],
                                    "question": entry["question"], "prediction": vocab[j],
                                    "probability": round(float(probs[row, j]), 4), "answers": entry["answers"]})
        result = EvalResult(len(predictions), {"vqa_score": vqa_score(predictions, answers)}, samples)
        return add_baselines(result, "vqa_score", types, vqa_scores(predictions, answers),
                             prior=vqa_scores([prior(k) for k in types], answers) if prior else None,
                             blind=vqa_scores(blind_predictions, answers) if blind else None)
