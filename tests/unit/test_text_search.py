"""Keyword query rewriting and reciprocal rank fusion (pure functions)."""

from hypothesis import given
from hypothesis import strategies as st

from serve_app.contracts import Hit
from serve_app.store.text_search import (
    any_term,
    candidate_terms,
    cjk_bigrams,
    lexemes,
    quote,
    reciprocal_rank_fusion,
)


def hit(chunk_id: int, dense: float | None = None, keyword: float | None = None) -> Hit:
    return Hit(chunk_id, f"d{chunk_id}", "t", {}, dense or keyword or 0.0, dense, keyword)


def test_words_become_alternatives_and_exclusions_stay_required():
    parsed = "'list' & 'directory' <-> 'contents' & !'foo'"
    assert any_term(parsed) == "( 'list' | 'directory' <-> 'contents' ) & !'foo'"
    # `or`: an OR of ANDs; an exclusion only one branch makes does not bind the others.
    parsed = "'list' & !'foo' | 'bar' & 'list' & !'foo' | 'baz'"
    assert any_term(parsed) == "( 'list' | 'bar' | 'baz' )"
    assert any_term("'a' & !'x' | 'b' & !'x'") == "( 'a' | 'b' ) & !'x'"
    assert any_term("'ls' & !'gnu' & !( 'a' <-> 'b' )") == "( 'ls' ) & !'gnu' & !( 'a' <-> 'b' )"


def test_an_ampersand_inside_a_lexeme_or_parentheses_is_not_split():
    assert any_term("'a&b' & 'c'") == "( 'a&b' | 'c' )"
    assert any_term("'it''s' & 'x'") == "( 'it''s' | 'x' )"
    assert any_term("!( 'a' & 'b' ) & 'c'") == "( 'c' ) & !( 'a' & 'b' )"


def test_nothing_wanted_gives_no_query():
    assert any_term("") == ""
    assert any_term("!'foo'") == ""


def test_korean_runs_become_bigrams_and_join_the_alternatives():
    assert cjk_bigrams("손해배상 청구 법 error 5") == ["손해", "해배", "배상", "청구", "법"]
    assert cjk_bigrams("东京タワー -손해배상") == ["东京", "京タ", "タワ", "ワー"]
    assert cjk_bigrams("plain english") == []
    assert any_term("'손해배상' & !'x'", ["손해", "해배"]) == (
        "( '손해배상' | '손해' | '해배' ) & !'x'"
    )
    assert any_term("", ["법"]) == "( '법' )"
    assert any_term("", ["it's"]) == "( 'it''s' )"


def test_a_terms_lexemes_are_its_quoted_words_unescaped():
    assert lexemes("'chmod'") == ["chmod"]
    assert lexemes("'civil' <-> 'act'") == ["civil", "act"]
    assert lexemes("'it''s' <2> 'a\\\\b'") == ["it's", "a\\b"]
    assert lexemes("'손해'") == ["손해"]


@given(st.text(min_size=1, max_size=12))
def test_lexemes_undo_quote(word):
    assert lexemes(quote(word)) == [word]


def test_candidates_are_the_rarest_terms_within_the_budget():
    frequencies = {"'the'": 900, "'chmod'": 3, "'mode'": 120, "'file'": 400}
    assert candidate_terms(frequencies, 1000) == ["'chmod'", "'mode'", "'file'"]
    assert candidate_terms(frequencies, 123) == ["'chmod'", "'mode'"]
    assert candidate_terms(frequencies, 10**9) == ["'chmod'", "'mode'", "'file'", "'the'"]
    # The rarest term always, even past the budget.
    assert candidate_terms({"'a'": 5000, "'b'": 7000}, 1000) == ["'a'"]


def test_fusion_ranks_a_chunk_both_lists_hold_first_and_reports_both_scores():
    dense = [hit(1, dense=0.9), hit(2, dense=0.8), hit(3, dense=0.7)]
    keyword = [hit(3, keyword=0.5), hit(4, keyword=0.4)]
    fused = reciprocal_rank_fusion(dense, keyword, k=60)
    assert [h.chunk_id for h in fused] == [3, 1, 2, 4]
    top = fused[0]
    assert (top.dense_score, top.keyword_score, top.fused_rank) == (0.7, 0.5, 1)
    assert top.score == 1 / 63 + 1 / 61
    assert fused[1].keyword_score is None and fused[3].dense_score is None
    assert [h.fused_rank for h in fused] == [1, 2, 3, 4]


def test_a_small_k_lets_the_top_of_one_list_beat_a_chunk_both_hold():
    dense = [hit(1, dense=0.9), hit(2, dense=0.8), hit(3, dense=0.7)]
    keyword = [hit(9, keyword=0.9), hit(4, keyword=0.4), hit(3, keyword=0.1)]
    assert reciprocal_rank_fusion(dense, keyword, k=60)[0].chunk_id == 3
    assert reciprocal_rank_fusion(dense, keyword, k=1)[0].chunk_id == 1


ranking = st.lists(st.integers(0, 30), unique=True, max_size=20)


@given(ranking, ranking, st.integers(1, 1000))
def test_fusion_holds_each_chunk_once_ordered_by_its_fused_score(dense_ids, keyword_ids, k):
    dense = [hit(i, dense=1.0 - n / 100) for n, i in enumerate(dense_ids)]
    keyword = [hit(i, keyword=1.0 - n / 100) for n, i in enumerate(keyword_ids)]
    fused = reciprocal_rank_fusion(dense, keyword, k)
    assert sorted(h.chunk_id for h in fused) == sorted(set(dense_ids) | set(keyword_ids))
    scores = [h.score for h in fused]
    assert scores == sorted(scores, reverse=True)
    for h in fused:
        expected = sum(
            1 / (k + ids.index(h.chunk_id) + 1)
            for ids in (dense_ids, keyword_ids)
            if h.chunk_id in ids
        )
        assert abs(h.score - expected) < 1e-12
        assert (h.dense_score is None) == (h.chunk_id not in dense_ids)
        assert (h.keyword_score is None) == (h.chunk_id not in keyword_ids)


# Few distinct ids and a small k: many chunks tie on their fused score.
tied = st.lists(st.integers(0, 12), unique=True, max_size=12)


@given(tied, tied, st.integers(1, 5), st.integers(0, 30))
def test_a_limit_keeps_the_first_hits_of_the_whole_fusion(dense_ids, keyword_ids, k, limit):
    dense = [hit(i, dense=1.0 - n / 100) for n, i in enumerate(dense_ids)]
    keyword = [hit(i, keyword=1.0 - n / 100) for n, i in enumerate(keyword_ids)]
    whole = reciprocal_rank_fusion(dense, keyword, k)
    assert reciprocal_rank_fusion(dense, keyword, k, limit=limit) == whole[:limit]
