"""CPU compute kernels that PyTorch does not provide fast enough, one module per family:

- `int8`: int8 weight-only products (numba for a few rows, dequantize + BLAS for many);
- `f32`: fp32 products of one row with a large weight (batch-1 decoding);
- `onednn`: oneDNN-packed fp32 weights and products with fused activations and residual adds;
- `w8a8`: int8 x int8 products, activations quantized per row (fbgemm, oneDNN);
- `attention`: decode-step rotary + cache writes and attention over cache slots;
- `draw`: the sampler's one-pass inverse-CDF draw;
- `block`: a whole transformer block for one token as one call (batch-1 decoding);
- `dots`: dot products with one or four weight rows at once, the inner loop of the numba products;
- `gelu`: the tanh GELU, vectorised, for prefill in bf16 and int8 x int8 modes;
- `registry`: every product path, whether it can run on this machine, and the choice among them,
  measured per machine and cached; `cpu`: the CPU's model and features, which the choice is keyed by.

Everything here works on tensors and arrays only: nothing imports the model or the engine. numba is
optional; `numba_ok()` says whether its kernels may run (not installed, CODEGEN_LM_NO_NUMBA set, or a
kernel failed once), and every caller has a PyTorch route for when they may not.
"""

from ._numba import numba_ok, set_threads

__all__ = ["numba_ok", "set_threads"]
