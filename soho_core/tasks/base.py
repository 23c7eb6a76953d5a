"""What a task is to the engine: a model whose forward turns a batch into a loss, a loader,
and an evaluation that turns predictions into metrics.

Every task model holds the shared SOHO trunk as ``self.trunk`` (backbone, visual embedding,
optional dictionary, fusion BERT); checkpoints store the whole task model, so fine-tuning
initialises any task's trunk from the ``trunk.*`` weights of a pre-training checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from soho_core.config import SohoConfig
from soho_core.models import SohoModel


class TensorBatch:
    """What task batches (dataclasses) share: ``_TENSORS`` names the fields the model takes, in
    the model's keyword names; the other fields (ids, raw entries, skip counts) stay on the host."""

    _TENSORS: tuple[str, ...] = ()

    def to(self, device: torch.device):
        return dataclasses.replace(self, **{k: getattr(self, k).to(device, non_blocking=True) for k in self._TENSORS})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._TENSORS}

    @property
    def num_texts(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class StepOutput:
    """loss: 0-dim with graph. stats: name -> (sum, count), detached 0-dim tensors; the engine
    reports sum(sums) / sum(counts) over a logging window and across ranks."""

    loss: torch.Tensor
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def mean_stat(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-step value averaged over steps."""
    return value.detach().float(), torch.ones((), device=value.device)


def classification_output(logits: torch.Tensor, targets: torch.Tensor, loss_name: str) -> StepOutput:
    """Cross-entropy of (R, C) logits against (R,) class targets, with its accuracy as a stat."""
    loss = torch.nn.functional.cross_entropy(logits, targets)
    acc = (logits.detach().argmax(1) == targets).float().mean()
    return StepOutput(loss, {loss_name: mean_stat(loss), "accuracy": mean_stat(acc)})


@dataclass
class EvalResult:
    num_examples: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few predictions, for reports
    # Blind baselines (see soho_core.tasks.baselines), empty for a task without them:
    primary: str = ""  # the metric that baselines and gain are about
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # {"prior"|"blind_model": {metric: v}}
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # {type: {"n", "metric", "prior", ...}}

    def measurement(self) -> dict[str, Any]:
        """What metrics.json holds beside ``metrics``: ``baselines``, ``gain`` (the primary metric
        minus the best baseline) and ``breakdown``; {} for a task without baselines."""
        if not self.primary:
            return {}
        out: dict[str, Any] = {"baselines": self.baselines, "breakdown": self.breakdown}
        if self.baselines:
            out["gain"] = self.metrics[self.primary] - max(b[self.primary] for b in self.baselines.values())
        return out


@torch.no_grad()
def evaluate_classifier(model: "TaskModel", batches: Iterable, device: torch.device,
                        describe: Callable[[Any, int, int, float], dict[str, Any]], num_samples: int = 8,
                        task: str = "", prior: Callable[[str], int] | None = None,
                        blind: bool = False) -> EvalResult:
    """Accuracy of ``model.logits`` over every batch (each with ``targets``); ``describe(batch,
    row, predicted class, its probability)`` turns the first ``num_samples`` rows into report samples.

    With ``task`` ("ve", "nlvr2") the result also holds the blind baselines and the per-type
    breakdown: ``prior(type)`` is the class the text prior predicts (None: not measured);
    ``blind`` runs every batch a second time with constant images (the batch's ``images`` and
    ``image_sizes`` fields)."""
    from soho_core.tasks.baselines import add_baselines, blind_inputs, text_type
    from soho_core.tasks.metrics import accuracy

    preds: list[int] = []
    blind_preds: list[int] = []
    targets: list[int] = []
    types: list[str] = []
    samples: list[dict[str, Any]] = []
    for batch in batches:
        inputs = batch.to(device).model_inputs()
        gold = inputs.pop("targets")
        probs = model.logits(**inputs).softmax(1)
        best = probs.argmax(1)
        preds += best.tolist()
        targets += gold.tolist()
        if task:
            types += [text_type(e, task) for e in batch.entries]
            if blind:
                blind_preds += model.logits(**blind_inputs(inputs)).argmax(1).tolist()
        for row in range(min(batch.num_texts, num_samples - len(samples))):
            samples.append(describe(batch, row, int(best[row]), round(float(probs[row, best[row]]), 4)))
    if not preds:
        raise ValueError("no readable examples in the evaluation split")
    result = EvalResult(len(preds), {"accuracy": accuracy(preds, targets)}, samples)
    if not task:
        return result

    def correct(predicted: list[int]) -> list[float]:
        return [float(p == t) for p, t in zip(predicted, targets)]

    return add_baselines(result, "accuracy", types, correct(preds),
                         prior=correct([prior(k) for k in types]) if prior else None,
                         blind=correct(blind_preds) if blind else None)


class TaskModel(nn.Module):
    """A trunk plus one small head. Subclasses implement ``forward(**batch.model_inputs())``."""

    trunk: SohoModel

    def backbone_parameters(self) -> list[nn.Parameter]:
        return self.trunk.backbone_parameters()

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters that start from scratch when fine-tuning (they get a larger rate)."""
        return []

    def load_trunk(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load ``trunk.*`` weights of another task model's checkpoint (dictionary buffers and
        pre-training heads are dropped when this trunk has none). Returns (missing, unexpected)."""
        trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
        if not trunk:
            raise ValueError("the checkpoint holds no trunk.* weights (not a SOHO task-model checkpoint)")
        own = self.trunk.state_dict()
        usable = {k: v for k, v in trunk.items() if k in own}
        result = self.trunk.load_state_dict(usable, strict=False)
        return list(result.missing_keys), sorted(set(trunk) - set(usable))


class Task:
    """Subclasses set ``name`` and implement the four methods below."""

    name: str = ""

    def max_steps(self, cfg: SohoConfig) -> int:
        """Optimizer steps of this task's fine-tune: ``finetune.task_steps[name]``, else ``finetune.max_steps``."""
        return cfg.finetune.task_steps.get(self.name, cfg.finetune.max_steps)

    def lr_schedule(self, cfg: SohoConfig) -> Callable[[int], float]:
        """step -> multiplier of every base learning rate (fine-tuning: its own warm-up and decay)."""
        from soho_core.train.optim import finetune_lr_factor

        return functools.partial(finetune_lr_factor, max_steps=self.max_steps(cfg),
                                 warmup_fraction=cfg.finetune.warmup_fraction)

    def metadata(self, data_uri: str, cfg: SohoConfig) -> dict[str, Any]:
        """Facts about the data the model needs to be rebuilt (e.g. VQA's answer vocabulary);
        stored in checkpoints so evaluation and prediction need no data at hand."""
        return {}

    def build_model(self, cfg: SohoConfig, vocab_size: int, meta: dict[str, Any]) -> TaskModel:
        raise NotImplementedError

    def loader(self, data_uri: str, split: str, cfg: SohoConfig, tokenizer, seed: int, train: bool) -> Iterable:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: TaskModel, data_uri: str, split: str, cfg: SohoConfig, tokenizer,
                 device: torch.device) -> EvalResult:
        raise NotImplementedError
