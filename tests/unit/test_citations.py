"""The RAG answer's citation filter: markers name given sources, and an uncited answer that
stands on one source cites it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from serve_app.pipelines.citations import CitationFilter, filter_citations, grounding_source
from serve_app.protocol.documents import Citation

SOURCES = [
    Citation(number=1, document_id="bzip2", chunk_id=0, score=0.9, text="bzip2 compresses files"),
    Citation(
        number=2,
        document_id="grep",
        chunk_id=0,
        score=0.8,
        text="grep searches input files for lines matching patterns and prints each match",
    ),
    Citation(number=3, document_id="chown", chunk_id=0, score=0.7, text="chown changes owners"),
]


def streamed(pieces: list[str], grounding: bool = True) -> str:
    kept = CitationFilter(SOURCES, grounding)
    return "".join(kept.feed(p) for p in pieces) + kept.close()


def test_markers_that_name_no_source_are_dropped_and_given_ones_kept() -> None:
    answer = "Use grep [2] to print matching lines [4] [1] [10]."
    assert filter_citations(answer, SOURCES) == "Use grep [2] to print matching lines [1]."


def test_a_marker_split_across_deltas_is_judged_whole() -> None:
    assert streamed(["Use grep [", "7] now [", "2", "]."]) == "Use grep now [2]."


def test_a_held_bracket_that_is_no_marker_comes_through() -> None:
    assert streamed(["grep [-e", " PATTERN] [", "file] [2]"]) == "grep [-e PATTERN] [file] [2]"


def test_an_uncited_answer_cites_the_source_it_stands_on() -> None:
    answer = "grep prints lines matching patterns in input files."
    assert grounding_source(answer, SOURCES) == 2
    assert filter_citations(answer, SOURCES) == answer + " [2]"


def test_an_answer_citing_only_missing_sources_gets_its_grounding_source() -> None:
    assert streamed(["grep prints matching lines [5]."]) == "grep prints matching lines. [2]"


def test_no_grounding_citation_for_a_refusal_or_when_turned_off() -> None:
    refusal = "The sources do not answer that question."
    assert filter_citations(refusal, SOURCES) == refusal
    assert streamed(["grep prints lines matching patterns."], grounding=False) == (
        "grep prints lines matching patterns."
    )


@given(
    st.lists(
        st.sampled_from(["grep", " prints", " [", "1", "2", "7", "]", " lines", "[", "x", ". "]),
        max_size=30,
    ),
    st.data(),
)
def test_any_split_of_the_stream_gives_the_whole_answers_text(words: list[str], data) -> None:
    answer = "".join(words)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(answer)), max_size=8)))
    pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)]
    assert streamed(pieces) == filter_citations(answer, SOURCES)
