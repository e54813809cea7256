"""A task head that the base checkpoint does not hold must be trained and saved with the adapter.

``AutoModelForSequenceClassification`` initialises a head that is missing from the checkpoint
(or whose shape differs, a different class count) at random. Unless ``adapter.modules_to_save``
covers it, training leaves it frozen at that draw and the adapter file does not carry it, so
every later load (``leanlora eval``) draws another one: the same adapter scores differently on
each call. This is refused before training starts.
"""

from __future__ import annotations

from torch import nn

from leanlora.config import AdapterConfig, ConfigError
from leanlora.targets import module_matches

FRESH_ATTR = "leanlora_fresh_weights"


def record_fresh_weights(model: nn.Module, loading_info: dict) -> None:
    """Keep the names transformers initialised at random (``output_loading_info=True``) on the model."""
    mismatched = [k if isinstance(k, str) else k[0] for k in loading_info.get("mismatched_keys", ())]
    setattr(model, FRESH_ATTR, tuple(sorted({*loading_info.get("missing_keys", ()), *mismatched})))


def _owners(key: str) -> list[str]:
    """``classifier.dense.weight`` -> [``classifier``, ``classifier.dense``]: the modules holding it."""
    parts = key.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def require_saved_head(model: nn.Module, adapter: AdapterConfig, task: str) -> None:
    """ConfigError naming adapter.modules_to_save when a randomly initialised weight would be neither
    trained nor saved."""
    if task == "causal_lm":
        return
    fresh = getattr(model, FRESH_ATTR, ())
    loose = [k for k in fresh if not any(module_matches(adapter.modules_to_save, owner) for owner in _owners(k))]
    if loose:
        modules = sorted({k.rsplit(".", 1)[0] for k in loose})
        raise ConfigError(
            f"adapter.modules_to_save={list(adapter.modules_to_save)} leaves {loose} untrained: the base checkpoint "
            f"does not hold them, so they start at random, and without training and saving them every "
            f"`leanlora eval` would draw them at random again. Add the head: "
            f"adapter.modules_to_save=[{', '.join(modules)}]")
