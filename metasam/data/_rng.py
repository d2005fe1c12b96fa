"""A random stream whose output is fixed forever by its seed words.

Episodes and splits must be identical on every machine and with every library version, so they are not
drawn with ``torch.randperm`` or ``numpy.random.Generator`` methods (neither promises a stable stream
across releases). Instead: ``numpy.random.SeedSequence(words)`` (a documented, frozen hash) seeds a
``PCG64`` bit generator (whose raw 64-bit output NumPy keeps stable), and the sampling algorithms below
(rejection sampling for a bounded integer, a partial Fisher–Yates shuffle) are ours and fixed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_TWO64 = 1 << 64


class StableRandom:
    """Deterministic draws from ``SeedSequence(words)``; ``words`` are non-negative integers."""

    def __init__(self, *words: int) -> None:
        self._bits = np.random.PCG64(np.random.SeedSequence(list(words)))
        self._buf: list[int] = []

    def _next(self) -> int:
        if not self._buf:
            self._buf = [int(x) for x in self._bits.random_raw(64)][::-1]
        return self._buf.pop()

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) by rejection sampling on 64-bit words (no modulo bias)."""
        if n <= 0:
            raise ValueError("n must be positive")
        limit = _TWO64 - (_TWO64 % n)
        while True:
            x = self._next()
            if x < limit:
                return x % n

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        """Uniform float in [low, high) from the top 53 bits of one word."""
        return low + (high - low) * ((self._next() >> 11) * (1.0 / (1 << 53)))

    def sample(self, n: int, k: int) -> list[int]:
        """k distinct integers from range(n), in random order (partial Fisher–Yates, O(k) memory)."""
        if not 0 <= k <= n:
            raise ValueError(f"cannot draw {k} distinct items from {n}")
        swapped: dict[int, int] = {}
        out = []
        for i in range(k):
            j = i + self.below(n - i)
            out.append(swapped.get(j, j))
            swapped[j] = swapped.get(i, i)
        return out

    def permutation(self, items: Sequence) -> list:
        return [items[i] for i in self.sample(len(items), len(items))]
