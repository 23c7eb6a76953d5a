"""Run under torchrun by tests/test_pretrain.py: the real engine, then each rank dumps its
dictionary buffers so the test can compare ranks bit for bit."""

import sys

import torch

from soho_core.config import load_config
from soho_core.env import runtime_env
from soho_core.tasks.catalog import get_task
from soho_core.train.engine import train

data, out, steps = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config("tiny", [f"train.max_steps={steps}", "train.log_every=2", "train.ckpt_every=100",
                           "data.images_per_batch=4"])
result = train(get_task("pretrain"), cfg, data, out)
state = {k[len("trunk."):]: v for k, v in result.model.state_dict().items() if "dictionary" in k}
torch.save(state, f"{out}/dictionary-rank{runtime_env().rank}.pt")
