"""Tests for matching.py: hand-computed scores, ordering rules, and MatchIndex == oracle."""

from __future__ import annotations

import math
import random

import pytest

from profile_app.matching.index import MatchIndex
from profile_app.matching.postings import token_bytes
from profile_app.matching.reference import interest_set, reference_matches, score, tokenize

Profiles = dict[str, tuple[list[str], str]]


def build(profiles: Profiles) -> MatchIndex:
    index = MatchIndex()
    for user_id, (interests, bio) in profiles.items():
        index.upsert(user_id, interests, bio)
    return index


def both(profiles: Profiles, user_id: str, k: int = 10) -> list[tuple[str, float]]:
    """Matches from the index, after checking they equal the brute-force oracle."""
    expected = reference_matches(user_id, profiles, k)
    assert build(profiles).top_matches(user_id, k) == expected
    return expected


# --------------------------------------------------------------- building blocks


def test_tokenize_lowercases_and_splits_on_non_alnum() -> None:
    assert tokenize("Hello, WORLD! It's 2024...") == ["hello", "world", "it", "s", "2024"]
    assert tokenize("") == []
    assert tokenize("!!! ... ---") == []
    assert tokenize("a a  b") == ["a", "a", "b"]


def test_interest_set_strips_and_lowercases() -> None:
    assert interest_set(["  Chess ", "chess", "GO"]) == frozenset({"chess", "go"})
    assert interest_set([]) == frozenset()


@pytest.mark.parametrize(
    "bio",
    [
        "",
        "Hello, World",
        "café naïve ÉCOLE",  # non-ASCII letters separate tokens
        "İstanbul ǅemal ß ﬁne Ⅻ ٣4",  # lower() quirks, ligatures, non-ASCII digits
        "tab\tnew\nline\r\x00nul",
        "emoji😀in🙂between",
        "lone \udc80 surrogate",
    ],
)
def test_fast_tokenizer_equals_reference_tokenizer(bio: str) -> None:
    assert [t.decode("ascii") for t in token_bytes(bio)] == tokenize(bio)


def test_fast_tokenizer_equals_reference_on_random_unicode() -> None:
    rng = random.Random(7)
    alphabet = "aZz09 ,.-_'İıßﬁéÉΣσς\u0130\u212a\u2160٣😀\t\n"
    for _ in range(2000):
        bio = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        bio += "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(5)))
        assert [t.decode("ascii") for t in token_bytes(bio)] == tokenize(bio)


# ------------------------------------------------------------- hand-computed scores


def test_jaccard_only() -> None:
    # I(P)={chess,go}, I(Q)={chess,poker}: |P & Q|=1, |P | Q|=3 -> jaccard 1/3; no bios -> cosine 0.
    # score = 0.5 * 1/3 = 0.1666666... -> 0.166667
    assert score(["chess", "go"], "", ["chess", "poker"], "") == 0.166667
    profiles = {"p": (["chess", "go"], ""), "q": (["chess", "poker"], "")}
    assert both(profiles, "p") == [("q", 0.166667)]


def test_cosine_only() -> None:
    # P = {cat:1, dog:1}, Q = {cat:1, dog:2}: dot = 1*1 + 1*2 = 3,
    # |P| = sqrt(2), |Q| = sqrt(5) -> cosine = 3/sqrt(10) = 0.9486833; no interests -> 0.
    # score = 0.5 * 0.9486833 = 0.4743416 -> 0.474342
    assert score([], "cat dog", [], "cat dog dog") == 0.474342
    profiles = {"p": ([], "cat dog"), "q": ([], "cat dog dog")}
    assert both(profiles, "p") == [("q", 0.474342)]


def test_jaccard_and_cosine() -> None:
    # interests {a,b} vs {b,c}: 1/3. bios "x y" vs "x y": dot 2 / (sqrt2*sqrt2) = 1 (to 1 ulp).
    # score = 0.5 * 1/3 + 0.5 * 1 = 0.6666666... -> 0.666667
    assert score(["a", "b"], "x y", ["b", "c"], "x y") == 0.666667
    profiles = {"p": (["a", "b"], "x y"), "q": (["b", "c"], "x y")}
    assert both(profiles, "p") == [("q", 0.666667)]


def test_empty_interests_on_both_sides_give_jaccard_zero() -> None:
    # union empty -> jaccard 0; identical bios -> cosine 1 -> score 0.5
    assert score([], "same words", [], "same words") == 0.5
    # no bios and no interests at all -> 0, so not a match
    assert score([], "", [], "") == 0.0
    profiles = {"p": ([], ""), "q": ([], ""), "r": ([], "")}
    assert both(profiles, "p") == []


def test_empty_bio_or_bio_without_tokens_gives_cosine_zero() -> None:
    # interests equal -> jaccard 1 -> 0.5; cosine 0 because one side has no tokens
    assert score(["x"], "", ["x"], "some words") == 0.5
    assert score(["x"], "!!! ... ???", ["x"], "some words") == 0.5
    assert score(["x"], "some words", ["x"], "   ") == 0.5
    profiles = {"p": (["x"], "?!"), "q": (["x"], "some words"), "r": ([], "some words")}
    assert both(profiles, "p") == [("q", 0.5)]


def test_interest_case_and_whitespace() -> None:
    # "  Chess " == "chess": {chess} vs {chess} -> jaccard 1 -> 0.5
    assert score(["  Chess "], "", ["chess"], "") == 0.5
    # {chess} vs {chess, go}: 1/2 -> 0.25 (the duplicate "CHESS" collapses)
    assert score(["chess", "CHESS"], "", ["chess", " go"], "") == 0.25
    profiles = {"p": (["  Chess "], ""), "q": (["chess"], ""), "r": (["CHESS", "Go"], "")}
    assert both(profiles, "p") == [("q", 0.5), ("r", 0.25)]


def test_bio_punctuation_and_case() -> None:
    # "Hello, WORLD!" -> [hello, world] == "hello world" -> cosine 1 (to 1 ulp) -> 0.5
    assert score([], "Hello, WORLD!", [], "hello world") == 0.5
    profiles = {"p": ([], "Hello, WORLD!"), "q": ([], "hello...world"), "r": ([], "helloworld")}
    assert both(profiles, "p") == [("q", 0.5)]


def test_duplicate_tokens_are_counted() -> None:
    # P = {a:2, b:1}, Q = {a:1}: dot = 2, |P| = sqrt(5), |Q| = 1 -> cosine 2/sqrt(5) = 0.8944272
    # score 0.4472136 -> 0.447214 (with sets it would be 1/sqrt(2)/2 = 0.353553)
    assert score([], "a a b", [], "a") == 0.447214
    profiles = {"p": ([], "a a b"), "q": ([], "a"), "r": ([], "b a")}
    # r: dot = 2 + 1 = 3, |r| = sqrt(2) -> 3/sqrt(10) = 0.9486833 -> 0.474342
    assert both(profiles, "p") == [("r", 0.474342), ("q", 0.447214)]


def test_ties_are_ordered_by_user_id() -> None:
    profiles = {u: (["x"], "") for u in ["u2", "b", "u10", "a", "p"]}
    # every pair has jaccard 1 -> 0.5; ties ascending by user_id (string order)
    assert both(profiles, "p") == [("a", 0.5), ("b", 0.5), ("u10", 0.5), ("u2", 0.5)]


def test_ties_after_rounding_are_ordered_by_user_id() -> None:
    # P = ({x}, "a b"). "b-exact": ({x}, "") -> jaccard 1, cosine 0 -> raw 0.5 exactly.
    # "a-ulp": ({}, "a b") -> jaccard 0, cosine 2/(sqrt2*sqrt2) = 0.9999999999999998
    #   -> raw 0.4999999999999999, which rounds to 0.5 as well.
    # Rounded they tie, so "a-ulp" wins by user_id although its raw score is lower.
    profiles = {"p": (["x"], "a b"), "b-exact": (["x"], ""), "a-ulp": ([], "a b")}
    assert 0.5 * (2 / (math.sqrt(2) * math.sqrt(2))) < 0.5
    assert both(profiles, "p", k=1) == [("a-ulp", 0.5)]
    assert both(profiles, "p") == [("a-ulp", 0.5), ("b-exact", 0.5)]


def test_self_is_excluded() -> None:
    profiles = {"p": (["x"], "hello"), "twin": (["x"], "hello")}
    result = both(profiles, "p")
    assert [u for u, _ in result] == ["twin"]


def test_zero_scores_are_excluded() -> None:
    profiles = {
        "p": (["x"], "alpha beta"),
        "nothing-shared": (["y"], "gamma"),
        "empty": ([], ""),
        "shared": (["x"], ""),
    }
    # shared: jaccard {x}/{x} = 1, cosine 0 (empty bio) -> 0.5; the others score exactly 0
    assert both(profiles, "p") == [("shared", 0.5)]


def test_scores_that_round_to_zero_are_excluded() -> None:
    # P = {a:1, c:2000}, Q = {a:1, b:2000}: dot = 1, |P| = |Q| = sqrt(4000001)
    # cosine = 1/4000001 = 2.5e-7 -> score 1.25e-7 -> round(., 6) = 0.0 -> not a match
    p_bio, q_bio = "a " + "c " * 2000, "a " + "b " * 2000
    assert score([], p_bio, [], q_bio) == 0.0
    profiles = {"p": ([], p_bio), "q": ([], q_bio)}
    assert both(profiles, "p") == []


def test_rounding_is_pythons_round_not_numpys() -> None:
    # {x} vs {x, i1..i319}: jaccard 1/320 -> raw 0.5/320 = 0.0015625, stored as a double a
    # hair above it. round(raw, 6) = 0.001563 (exact decimal), np.round(raw, 6) = 0.001562
    # (raw * 1e6 == 1562.5 exactly, then half-to-even).
    q_interests = ["x"] + [f"i{n}" for n in range(1, 320)]
    assert score(["x"], "", q_interests, "") == 0.001563
    profiles = {"p": (["x"], ""), "q": (q_interests, "")}
    assert both(profiles, "p") == [("q", 0.001563)]


def test_k_limit() -> None:
    profiles = {f"q{i:02d}": (["x"], f"w{i}") for i in range(15)}
    profiles["p"] = (["x"], "")
    # each q: jaccard 1, no cosine -> 0.5; the 10 smallest ids win
    expected = [(f"q{i:02d}", 0.5) for i in range(10)]
    assert both(profiles, "p") == expected
    assert both(profiles, "p", k=3) == expected[:3]
    assert both(profiles, "p", k=100) == [(f"q{i:02d}", 0.5) for i in range(15)]
    assert build(profiles).top_matches("p", k=0) == []


# ------------------------------------------------------------------- MatchIndex


def test_replacement_via_upsert_changes_results() -> None:
    index = MatchIndex()
    index.upsert("p", ["chess"], "i love chess openings")
    index.upsert("q", ["chess"], "chess openings")
    index.upsert("r", ["golf"], "golf")
    before = index.top_matches("p")
    assert [u for u, _ in before] == ["q"]

    # q's old interests and tokens must no longer count; r now matches p
    index.upsert("q", ["golf"], "golf only")
    index.upsert("r", ["Chess"], "I LOVE chess")
    profiles = {
        "p": (["chess"], "i love chess openings"),
        "q": (["golf"], "golf only"),
        "r": (["Chess"], "I LOVE chess"),
    }
    assert index.top_matches("p") == reference_matches("p", profiles)
    assert [u for u, _ in index.top_matches("p")] == ["r"]
    assert index.top_matches("q") == reference_matches("q", profiles)
    assert len(index) == 3


def test_unknown_user_raises_key_error() -> None:
    index = MatchIndex()
    with pytest.raises(KeyError):
        index.top_matches("nobody")
    index.upsert("a", ["x"], "hi")
    with pytest.raises(KeyError):
        index.top_matches("nobody")
    with pytest.raises(KeyError):
        reference_matches("nobody", {"a": (["x"], "hi")})


def test_len_contains_and_remove() -> None:
    index = MatchIndex([("a", ["x"], "hi"), ("b", ["x"], "hi")])
    index.upsert("a", ["y"], "hi there")
    assert len(index) == 2
    assert "a" in index and "b" in index and "c" not in index
    assert ["unhashable"] not in index
    assert index.top_matches("a") == [("b", 0.353553)]  # cosine 1/sqrt(2), jaccard 0
    assert index.remove("b") is True
    assert index.remove("b") is False
    assert len(index) == 1 and "b" not in index
    assert index.top_matches("a") == []
    with pytest.raises(KeyError):
        index.top_matches("b")


def test_single_profile_and_empty_profile() -> None:
    index = MatchIndex()
    index.upsert("only", [], "")
    assert index.top_matches("only") == []
    index.upsert("other", [], "")
    assert index.top_matches("only") == []


def test_progress_is_optional_bounded_and_monotone() -> None:
    profiles = {f"u{i}": (["x", f"i{i % 3}"], f"w{i % 5} common") for i in range(50)}
    index = build(profiles)
    seen: list[float] = []
    assert index.top_matches("u1", progress=seen.append) == reference_matches("u1", profiles)
    assert 1 <= len(seen) <= 20
    assert seen == sorted(seen) and seen[0] >= 0.0 and seen[-1] == 1.0


# ------------------------------------------------------------- randomized oracle

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "Café", "naïve", "x1", "42"]
INTERESTS = ["chess", " Chess", "go", "GO ", "music", "art", "", " ", "hiking", "tea"]


def random_profile(rng: random.Random) -> tuple[list[str], str]:
    n_words = rng.choice([0, 0, 1, 2, 3, 5, 8, 12])
    seps = [" ", "  ", ", ", "!", "\n", "-", "é"]
    bio = "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(n_words))
    if rng.random() < 0.1:
        bio = rng.choice(["", "!!!", "...", "   "])
    n_int = rng.choice([0, 1, 1, 2, 3, 4])
    interests = [rng.choice(INTERESTS) for _ in range(n_int)]
    return interests, bio


@pytest.mark.parametrize("seed", range(8))
def test_index_equals_reference_under_random_upserts(seed: int) -> None:
    rng = random.Random(seed)
    # Small thresholds on some seeds, so the delta merge and tombstone compaction run
    # many times; the default (large) thresholds keep everything in the delta.
    small = {"merge_min": rng.choice([1, 4, 16]), "compact_min": rng.choice([1, 8, 32])}
    index = MatchIndex(**small) if seed % 2 else MatchIndex()
    n_users = rng.choice([150, 300])
    profiles: Profiles = {}
    for step in range(3 * n_users):
        user_id = f"u{rng.randrange(n_users)}"  # repeats -> replacements
        interests, bio = random_profile(rng)
        profiles[user_id] = (interests, bio)
        index.upsert(user_id, interests, bio)
        if rng.random() < 0.03:
            gone = rng.choice(sorted(profiles))
            del profiles[gone]
            assert index.remove(gone)
        if step % 53 == 0:  # a build paid ahead of the query (as a Dask worker's snapshot)
            index.settle()
        if step % 37 == 0:  # query while updates are still coming in
            probe = rng.choice(sorted(profiles))
            k = rng.choice([1, 3, 10])
            assert index.top_matches(probe, k) == reference_matches(probe, profiles, k)
    assert len(index) == len(profiles)
    for user_id in sorted(profiles):
        assert index.top_matches(user_id) == reference_matches(user_id, profiles), user_id


def test_index_equals_reference_with_heavy_ties() -> None:
    # Two interests and three words: thousands of exact ties among ~400 profiles.
    rng = random.Random(99)
    profiles: Profiles = {}
    index = MatchIndex()
    for i in range(400):
        interests = rng.sample(["x", "y"], rng.randrange(3))
        bio = " ".join(rng.choice("abc") for _ in range(rng.randrange(4)))
        profiles[f"user{i}"] = (interests, bio)
        index.upsert(f"user{i}", interests, bio)
    for user_id in sorted(profiles)[::7]:
        assert index.top_matches(user_id) == reference_matches(user_id, profiles)


def test_index_equals_reference_hypothesis() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    word = st.sampled_from([*WORDS, "A", "é", "Ω"])
    bio = st.lists(word, max_size=8).map(" ".join) | st.text(max_size=20)
    interests = st.lists(st.sampled_from(INTERESTS), max_size=4)
    ops = st.lists(st.tuples(st.integers(0, 6), interests, bio), min_size=1, max_size=30)

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(ops)
    def check(ops: list[tuple[int, list[str], str]]) -> None:
        index = MatchIndex(merge_min=2, compact_min=2)
        profiles: Profiles = {}
        for n, its, text in ops:
            profiles[f"u{n}"] = (its, text)
            index.upsert(f"u{n}", its, text)
        for user_id in profiles:
            assert index.top_matches(user_id, 3) == reference_matches(user_id, profiles, 3)

    check()
