"""Factor strategies: where A (r, in) and B (out, r) come from."""

from leanlora.factors.bank import BankFactors, VectorBank
from leanlora.factors.dense import DenseFactors

__all__ = ["BankFactors", "DenseFactors", "VectorBank"]
