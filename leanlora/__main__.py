"""``python -m leanlora`` is the ``leanlora`` command."""

from leanlora.cli import entry

entry()
