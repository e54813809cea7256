"""Base strategies: the frozen pretrained weight, dense or quantized."""

from leanlora.base.dense import DenseBase, is_conv1d, supported_linear

__all__ = ["DenseBase", "is_conv1d", "supported_linear"]
