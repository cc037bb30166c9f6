"""Tasks: what the one training loop needs to know about a kind of training.

  registry.py   what the rest of lmforge needs to know about each task, as data (no torch)
  base.py       the Task hooks the loop calls; finetune.py the hooks the fine-tuning tasks share
  clm.py, mlm.py, classify.py, tag.py, sft.py, seq2seq.py, span.py   one module per task

Adding a task is its module plus one `registry.register(...)` entry; `make_task` imports the module
when the task is built. This file imports nothing heavy, so that the registry is read without torch.
"""

from __future__ import annotations

import importlib

from lmforge.tasks import registry


def make_task(cfg):
    """The Task for cfg.task, its class imported from where the registry says (tasks/registry.py)."""
    module, _, cls = registry.spec(cfg.task).task_class.partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)
