"""Adapted layers in groups that share stacked parameters (:mod:`leanlora.groups.stacking`) and the
strategy modules' view of their rows (:mod:`leanlora.groups.rows`)."""
