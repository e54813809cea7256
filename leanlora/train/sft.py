"""TRL's ``SFTTrainer`` with a leanlora adapter (needs ``pip install trl``).

``SFTTrainer`` takes a model that already holds a leanlora adapter like any other model (no
``peft_config``); the mixin adds what leanlora needs and TRL cannot know: the prior in the loss,
leanlora's parameter groups, adapter-only checkpoints and the rank/bits/BOPs logs
(:class:`leanlora.train.callbacks.LeanLoraMixin`).

    leanlora.inject(model, AdapterConfig(target_modules=("q_proj", "v_proj")))
    trainer = LeanLoraSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats, processing_class=tok)
"""

from __future__ import annotations

from trl import SFTTrainer

from leanlora.train.callbacks import LeanLoraMixin


class LeanLoraSFTTrainer(LeanLoraMixin, SFTTrainer):
    """``trl.SFTTrainer`` for a model that holds a leanlora adapter (see :class:`LeanLoraMixin`)."""
