"""Pre-training: MLM + MVM + ITM (+ ITC where the model has the head) on image-caption shards
(``soho pretrain``)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from soho_core.config import SohoConfig
from soho_core.data.pretrain_data import pretrain_loader
from soho_core.models import SohoModel
from soho_core.tasks.base import EvalResult, StepOutput, Task, TaskModel, mean_stat
from soho_core.tasks.baselines import BLIND, blind_inputs
from soho_core.train.optim import lr_factor


class PretrainModel(TaskModel):
    def __init__(self, cfg: SohoConfig, vocab_size: int):
        super().__init__()
        self.trunk = SohoModel(cfg.model, vocab_size)
        self.mvm_prob = cfg.pretrain.mvm_image_prob
        self.loss_weights = dict(cfg.pretrain.loss_weights)
        self.itc_temperature = cfg.pretrain.itc_temperature

    def forward(self, **batch: torch.Tensor) -> StepOutput:
        out = self.trunk.pretrain_forward(**batch, mvm_prob=self.mvm_prob, loss_weights=self.loss_weights,
                                          itc_temperature=self.itc_temperature)
        num_mvm = torch.as_tensor(float(out.num_mvm), device=out.loss.device)
        names = ["loss_mlm", "loss_mvm", "loss_itm", "acc_itm", "acc_mlm"]
        names += ["loss_itc", "acc_itc"] if out.loss_itc is not None else []
        stats = {name: mean_stat(getattr(out, name)) for name in names}
        stats["acc_mvm"] = (out.acc_mvm.detach().float() * num_mvm, num_mvm)
        return StepOutput(out.loss, stats)

    def dictionary_stats(self) -> dict[str, float]:
        return self.trunk.dictionary_stats()


class PretrainTask(Task):
    name = "pretrain"

    def max_steps(self, cfg: SohoConfig) -> int:
        return cfg.train.max_steps

    def lr_schedule(self, cfg: SohoConfig):
        return functools.partial(lr_factor, cfg=cfg.optim)

    def build_model(self, cfg: SohoConfig, vocab_size: int, meta: dict[str, Any]) -> PretrainModel:
        return PretrainModel(cfg, vocab_size)

    def loader(self, data_uri, split, cfg, tokenizer, seed, train):
        return pretrain_loader(data_uri, split, cfg, tokenizer, seed, train)

    @torch.no_grad()
    def evaluate(self, model, data_uri, split, cfg, tokenizer, device) -> EvalResult:
        """ITM and MLM accuracy on a held-out split (no MVM masking in evaluation), and beside
        them the same batches with constant images (``finetune.eval_blind``): ITM's chance is 0.5,
        and MLM guesses many words from the caption alone."""
        passes = 2 if cfg.finetune.eval_blind else 1
        totals = torch.zeros(passes, 4, dtype=torch.float64)  # (pass, [itm hits, texts, mlm hits, masked])
        images = 0
        for batch in pretrain_loader(data_uri, split, cfg, tokenizer, seed=cfg.train.seed, train=False):
            inputs = batch.to(device).model_inputs()
            t, m = batch.num_texts, int((batch.mlm_labels != -100).sum())
            for k, x in enumerate((inputs, blind_inputs(inputs))[:passes]):
                out = model.trunk.pretrain_forward(**x)
                totals[k] += torch.tensor([float(out.acc_itm) * t, t, float(out.acc_mlm) * m, m], dtype=torch.float64)
            images += batch.images.shape[0]

        def accuracies(row: torch.Tensor) -> dict[str, float]:
            return {"acc_itm": float(row[0] / max(row[1], 1)), "acc_mlm": float(row[2] / max(row[3], 1))}

        result = EvalResult(images, accuracies(totals[0]))
        if passes == 2:
            result.primary, result.baselines = "acc_itm", {BLIND: accuracies(totals[1])}
        return result
