"""The errors of saving and loading adapters (one base class, so a caller can catch them all)."""

from __future__ import annotations


class AdapterError(RuntimeError):
    """An adapter cannot be saved, exported or loaded as asked; the message says which file and why."""


class AdapterLoadError(AdapterError):
    """The adapter files cannot be loaded onto this model; the message says which file and why."""


class BaseMismatchError(AdapterLoadError):
    """The model is not the base the adapter was saved with. ``reason`` says how it differs.

    The message advises the library's override; the command line says ``--no-base-check`` instead.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}; pass check_base=False to leanlora.load to load it anyway")


class AdapterSaveError(AdapterError):
    """The adapter cannot be written (it holds NaN/inf, or the folder cannot be replaced)."""


class ExportError(ValueError):
    """The adapter cannot be written in the asked format; the message says why and what to use."""
