"""Token windows for chunking: which tokens of a document each chunk holds.

Pure arithmetic on token counts, so that the bounds hold whatever the tokenizer: every token
lies in at least one window, the last window ends at the last token, and a document of `n`
tokens has at most `ceil((n - overlap) / stride) + 1` windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A window advances by at least this share of its size, so a token lies in at most four
# windows whatever overlap is asked: an overlap near the window's size would otherwise make
# one chunk per token.
MIN_STRIDE_SHARE = 0.25


@dataclass(frozen=True)
class Windows:
    """Window size and overlap in tokens, as applied after the model's limit."""

    size: int
    overlap: int

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    @classmethod
    def fit(cls, max_tokens: int, overlap: int, model_tokens: int) -> Windows:
        """`max_tokens` cut to what the model reads, and `overlap` cut with it.

        An overlap asked for a larger window keeps its share of the window (256 of 1024 becomes
        63 of 254), and never leaves a stride under MIN_STRIDE_SHARE of the window.
        """
        size = max(1, min(max_tokens, model_tokens))
        if size < max_tokens:
            overlap = overlap * size // max_tokens
        min_stride = max(1, math.ceil(size * MIN_STRIDE_SHARE))
        return cls(size=size, overlap=max(0, min(overlap, size - min_stride)))

    def spans(self, n: int) -> list[tuple[int, int]]:
        """[start, end) token ranges covering tokens 0..n-1; the last one ends at n."""
        if n <= 0:
            return []
        starts = range(0, max(1, n - self.size), self.stride)
        spans = [(start, min(start + self.size, n)) for start in starts]
        if spans[-1][1] < n:  # the tail: one more window, ending at the last token
            spans.append((max(0, n - self.size), n))
        return spans

    def max_count(self, n: int) -> int:
        """The most windows a document of `n` tokens is cut into."""
        return 0 if n <= 0 else math.ceil(max(0, n - self.overlap) / self.stride) + 1
