"""Profile matching: the reference score and an incremental in-memory index.

Contract, for a profile P against every other stored profile Q:

* ``jaccard`` = |I(P) & I(Q)| / |I(P) | I(Q)|, I = interests ``.strip().lower()``-ed;
  0 when the union is empty.
* ``cosine`` = cosine similarity of the bio token-count vectors (tokens from
  :func:`tokenize`); 0 when either bio has no tokens.
* ``score`` = ``round(0.5 * jaccard + 0.5 * cosine, 6)``.
* matches = the ``k`` (10) highest scores > 0, by score descending, ties by
  ``user_id`` ascending; P itself is never among its matches.

:func:`reference_matches` is the brute-force oracle; :class:`MatchIndex` gives the
same answers (bit-identical floats, same order) with cost proportional to the
postings shared with P.

This package is pure: it imports only the standard library and numpy.
"""

from profile_app.matching.index import MatchIndex
from profile_app.matching.reference import interest_set, reference_matches, score, tokenize

__all__ = ["MatchIndex", "interest_set", "reference_matches", "score", "tokenize"]
