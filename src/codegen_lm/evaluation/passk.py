"""The unbiased pass@k estimator of the Codex paper.

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k
samples drawn without replacement from the n contain at least one that passes. The ratio of binomials
is computed as a running product, which stays exact in floating point where C(200, 100) would not.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with n samples, c of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    fail_all = 1.0
    for m in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod over m in (n-c, n] of (1 - k/m)
        fail_all *= 1.0 - k / m
    return 1.0 - fail_all


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """{'pass@k': mean over problems} for each k that every problem has enough samples for
    (the reference harness leaves out the other ks the same way)."""
    out = {}
    for k in ks:
        if counts and all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return out
