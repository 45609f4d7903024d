"""Keyword queries and their fusion with dense results (pure functions, no database).

`terms` splits a parsed web-search query into the terms a passage may match (any of them),
`cjk_bigrams` adds those of Korean, Chinese and Japanese text, `lexemes` names each term's
words in the store's term statistics, `candidate_terms` picks the terms whose chunks are
scored, `idf` weighs each, and
`reciprocal_rank_fusion` merges a dense and a keyword candidate list into one ranking
(Cormack et al., 2009).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.contracts import Hit


def _top_level(query: str, operator: str) -> list[str]:
    """The operands of a tsquery's text joined by `operator` (`&` or `|`) outside parentheses
    and quoted lexemes (a lexeme such as `'a&b'` keeps its `&`)."""
    parts, depth, quoted, start = [], 0, False, 0
    i = 0
    while i < len(query):
        char = query[i]
        if quoted:
            if char == "'" and query[i + 1 : i + 2] == "'":  # an escaped quote
                i += 1
            elif char == "'":
                quoted = False
        elif char == "'":
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == operator and depth == 0:
            parts.append(query[start:i].strip())
            start = i + 1
        i += 1
    parts.append(query[start:].strip())
    return [p for p in parts if p]


# The same ranges as rag_cjk_bigrams in the store's schema (migration 5): Hangul syllables,
# kana, CJK ideographs.
CJK_RUN = re.compile("[\uac00-\ud7a3\u3040-\u30ff\u4e00-\u9fff]+")


def cjk_bigrams(text: str) -> list[str]:
    """Overlapping character bigrams of each run of Korean, Chinese or Japanese characters
    (a one-character run as itself), as the store indexes them; words excluded with a
    leading `-` give none. Without these, 손해배상 would never find 손해배상을 (one
    space-separated token with its particle)."""
    kept = " ".join(word for word in text.split() if not word.startswith("-"))
    grams: dict[str, None] = {}
    for run in CJK_RUN.findall(kept):
        for i in range(max(len(run) - 1, 1)):
            grams[run[i : i + 2]] = None
    return list(grams)


def quote(lexeme: str) -> str:
    """A lexeme as tsquery text: quoted, its quotes and backslashes escaped."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass(frozen=True)
class Terms:
    """A keyword query's parts, as tsquery texts: what it wants (any of) and excludes (all)."""

    wanted: list[str]
    excluded: list[str]

    def any_of(self, wanted: list[str] | None = None) -> str:
        """A tsquery matching any of `wanted` (default: all wanted) and none of the excluded;
        '' when nothing is wanted."""
        wanted = self.wanted if wanted is None else wanted
        if not wanted:
            return ""
        return " & ".join(["( " + " | ".join(wanted) + " )", *self.excluded])


def terms(parsed: str, also: list[str] | None = None) -> Terms:
    """The parts of `parsed`, which is `websearch_to_tsquery(...)::text` and requires every
    word: its wanted operands (words, phrases) of every `or` branch, then the lexemes in
    `also` (`cjk_bigrams`); an exclusion (`!...`) every branch makes stays required.

    A question rarely shares every word with its answer, so the store asks for any of the
    wanted terms and ranks the passages holding the rarer ones first.
    """
    # `&` binds tighter than `|`: the text is an OR of ANDs.
    branches = [_top_level(branch, "&") for branch in _top_level(parsed, "|")]
    wanted = [p for operands in branches for p in operands if not p.startswith("!")]
    wanted += [quote(lexeme) for lexeme in also or []]
    first = branches[0] if branches else []
    excluded = [p for p in first if p.startswith("!") and all(p in b for b in branches)]
    return Terms(list(dict.fromkeys(wanted)), excluded)


def any_term(parsed: str, also: list[str] | None = None) -> str:
    """`terms(parsed, also)` as one tsquery: any wanted term, no excluded one."""
    return terms(parsed, also).any_of()


# A quoted lexeme in tsquery text; PostgreSQL doubles the quotes and backslashes inside.
LEXEME = re.compile(r"'((?:[^'\\]|''|\\.)*)'")


def lexemes(term: str) -> list[str]:
    """The lexemes of a tsquery operand (one word, or the words of a phrase), unquoted: the
    keys of the store's term statistics."""
    return [re.sub(r"''|\\(.)", lambda m: m.group(1) or "'", m) for m in LEXEME.findall(term)]


def candidate_terms(frequencies: dict[str, int], budget: int) -> list[str]:
    """The terms whose chunks are scored: rarest first while their chunks together stay
    within `budget`, and always the rarest one.

    A chunk holding only commoner terms is left out. Its score (the idf of the terms it holds)
    is low: the terms past the budget are the most common of the query. Scoring reads every
    candidate's tsvector, so the budget bounds a query's cost whatever its words.
    """
    chosen, total = [], 0
    for term in sorted(frequencies, key=lambda t: frequencies[t]):
        total += frequencies[term]
        if chosen and total > budget:
            break
        chosen.append(term)
    return chosen


def idf(df: int, n: int) -> float:
    """BM25's inverse document frequency of a term in `df` of `n` chunks (always > 0).

    `ts_rank_cd` alone weighs every word alike, so "the" counts as much as "chmod"; weighting
    each matched term by its rarity ranks the passage that holds the query's rare words first.
    The keyword rows of docs/benchmarks/retrieval.md measure the ranking as built."""
    return math.log(1.0 + (n - df + 0.5) / (df + 0.5))


def reciprocal_rank_fusion(
    dense: list[Hit], keyword: list[Hit], k: int = 60, limit: int | None = None
) -> list[Hit]:
    """One list from two rankings: each chunk scores the sum of 1 / (k + rank) over the
    lists that hold it (rank from 1), highest first; ties keep the dense order, then the
    keyword order. Each hit carries both lists' scores (None where a list lacks it), the
    fused score as `score` and its place as `fused_rank`.

    `limit` keeps the first `limit` hits only (the same as slicing the whole list), and builds
    no others: a hybrid search fuses ~80 candidates to return 10."""
    fused: dict[int, float] = {}
    dense_scores: dict[int, float] = {}
    keyword_scores: dict[int, float] = {}
    hits: dict[int, Hit] = {}
    for ranked, scores, attribute in (
        (dense, dense_scores, "dense_score"),
        (keyword, keyword_scores, "keyword_score"),
    ):
        for rank, hit in enumerate(ranked, start=1):
            if hit.chunk_id in scores:  # a list names a chunk once; a repeat adds nothing
                continue
            scores[hit.chunk_id] = getattr(hit, attribute)
            fused[hit.chunk_id] = fused.get(hit.chunk_id, 0.0) + 1.0 / (k + rank)
            hits.setdefault(hit.chunk_id, hit)
    order = sorted(fused, key=lambda chunk: -fused[chunk])  # stable: first-seen order on ties
    if limit is not None:
        order = order[:limit]
    return [
        replace(
            hits[chunk],
            score=fused[chunk],
            dense_score=dense_scores.get(chunk),
            keyword_score=keyword_scores.get(chunk),
            fused_rank=place,
        )
        for place, chunk in enumerate(order, start=1)
    ]
