"""What a failed ``torch.compile`` says: whether an error came from the compiler, and its root cause.

Shared by the compiled layers (:mod:`leanlora.train.compiled`), the compiled grouped pieces
(:mod:`leanlora.groups.stacking`) and the captured training step (:mod:`leanlora.train.step_graph`),
which all fall back to plainer code and say why.
"""

from __future__ import annotations


def root_cause(err: BaseException) -> str:
    """The innermost error's type and first line (the compiler wraps what actually failed)."""
    seen = {id(err)}
    while (err.__cause__ or err.__context__) is not None and id(err.__cause__ or err.__context__) not in seen:
        err = err.__cause__ or err.__context__
        seen.add(id(err))
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:300]}"


def is_compile_error(err: BaseException) -> bool:
    """True for errors raised while compiling (dynamo, inductor, Triton), not by the model itself."""
    if (type(err).__module__ or "").startswith(("torch._dynamo", "torch._inductor", "triton")):
        return True
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and is_compile_error(cause)
