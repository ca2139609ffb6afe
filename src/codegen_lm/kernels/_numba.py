"""Whether the numba kernels can run, and their thread count (one switch for every kernel module).

Every kernel is compiled with error_model="numpy": a division by zero (a softmax whose scores are all
NaN, a NaN LayerNorm epsilon) gives IEEE inf/NaN like PyTorch does, not a ZeroDivisionError raised out
of the middle of a decoding step.
"""

from __future__ import annotations

import os

import torch

try:
    if os.environ.get("CODEGEN_LM_NO_NUMBA"):
        raise ImportError("disabled by CODEGEN_LM_NO_NUMBA")
    import numba
    from numba.core import types
    from numba.extending import intrinsic

    HAVE_NUMBA = True

    @intrinsic
    def float_from_bits(typingctx, bits):
        """The float32 whose bits are the int32 `bits` (a register move; numba has no scalar bitcast)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return types.float32(types.int32), codegen
except Exception:  # not installed, or disabled: every kernel has a PyTorch route
    numba = None
    HAVE_NUMBA = False


def numba_ok() -> bool:
    """Whether numba kernels may run (tests switch them off by setting HAVE_NUMBA = False)."""
    return HAVE_NUMBA


def set_threads() -> None:
    """Run the next numba kernel on as many threads as PyTorch uses (--threads sets both)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
