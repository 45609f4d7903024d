"""Citation markers in a streamed RAG answer: only sources the answer was given, and at least one.

A small model cites by habit, not by reading: it writes [4] or [10] when three sources were
given, runs of such markers, or no marker at all. `CitationFilter` sits between the generator's
deltas and the client:
- a marker that names no given source is dropped;
- a finished answer that cites no given source gets one (unless `rag.grounding_citation` is
  off): the source that holds the most of the answer's words, if it holds at least half of
  them (an answer that says the sources do not answer shares few of their words, and gets
  none).

Markers are matched as they stream: a delta ending in a partial marker (`[`, `[1`, or a space
that may precede one) holds that part back until the next delta completes or clears it.
docs/benchmarks/rag_answers.md measures answers with and without the filter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from serve_app.protocol.documents import Citation

MARKER = re.compile(r" ?\[(\d{1,3})\]")
# What may still become a marker, with the space a dropped marker takes along: held back.
PARTIAL = re.compile(r" ?(?:\[\d{0,3})?$")
WORD = re.compile(r"\w{4,}")  # words of 4+ letters, in any script
GROUNDED = 0.5  # share of the answer's words a source must hold to be cited for it


def grounding_source(answer: str, citations: Sequence[Citation]) -> int | None:
    """The number of the source holding the most of `answer`'s distinct words (the better
    ranked on a tie), if it holds at least GROUNDED of them; else None."""
    words = set(WORD.findall(answer.lower()))
    if not words:
        return None
    best, held = None, 0
    for citation in citations:
        shared = len(words & set(WORD.findall(citation.text.lower())))
        if shared > held:
            best, held = citation.number, shared
    return best if held >= GROUNDED * len(words) else None


class CitationFilter:
    """Feed it each delta's text in order, then `close()` once; emit what each call returns."""

    def __init__(self, citations: Sequence[Citation], grounding: bool = True) -> None:
        self.citations = list(citations)
        self.grounding = grounding
        self.numbers = {c.number for c in citations}
        self.held = ""  # a partial marker at the end of the text so far
        self.text: list[str] = []  # what was let through
        self.cited = False

    def feed(self, text: str) -> str:
        text = self.held + text
        partial = PARTIAL.search(text)  # matches at the end at least (an empty tail)
        cut = partial.start() if partial else len(text)
        self.held = text[cut:]
        out = MARKER.sub(self._keep, text[:cut])
        self.text.append(out)
        return out

    def close(self) -> str:
        """The rest: a held partial that never became a marker, and the grounding citation of
        an answer that cites no given source."""
        out, self.held = self.held, ""
        self.text.append(out)
        if self.grounding and not self.cited:
            number = grounding_source("".join(self.text), self.citations)
            if number is not None:
                out += f" [{number}]"
        return out

    def _keep(self, marker: re.Match[str]) -> str:
        if int(marker.group(1)) in self.numbers:
            self.cited = True
            return marker.group(0)
        return ""


def filter_citations(answer: str, citations: Sequence[Citation], grounding: bool = True) -> str:
    """A whole answer through `CitationFilter`: what a client of the stream reads."""
    kept = CitationFilter(citations, grounding)
    return kept.feed(answer) + kept.close()
