"""The match score as the contract defines it, and the brute-force oracle.

Pure: imports only the standard library.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokenize(bio: str) -> list[str]:
    """Bio tokens: runs of ``[a-z0-9]`` in the lower-cased text, in order, with repeats."""
    return _TOKEN_RE.findall(bio.lower())


def interest_set(interests: Iterable[str]) -> frozenset[str]:
    """The set of interests, each ``.strip().lower()``-ed."""
    return frozenset(i.strip().lower() for i in interests)


def score(p_interests: Iterable[str], p_bio: str, q_interests: Iterable[str], q_bio: str) -> float:
    """Reference score of one pair: ``round(0.5 * jaccard + 0.5 * cosine, 6)``."""
    pi = interest_set(p_interests)
    qi = interest_set(q_interests)
    union = pi | qi
    jaccard = len(pi & qi) / len(union) if union else 0.0

    pc = Counter(tokenize(p_bio))
    qc = Counter(tokenize(q_bio))
    if pc and qc:
        dot = sum(c * qc[t] for t, c in pc.items() if t in qc)
        p_norm = math.sqrt(sum(c * c for c in pc.values()))
        q_norm = math.sqrt(sum(c * c for c in qc.values()))
        cosine = dot / (p_norm * q_norm)
    else:
        cosine = 0.0
    return round(0.5 * jaccard + 0.5 * cosine, 6)


def reference_matches(
    user_id: str, profiles: Mapping[str, tuple[Sequence[str], str]], k: int = 10
) -> list[tuple[str, float]]:
    """Brute-force top-``k`` matches of ``user_id`` over ``score()`` (the test oracle)."""
    p_interests, p_bio = profiles[user_id]
    scored = []
    for q_id, (q_interests, q_bio) in profiles.items():
        if q_id == user_id:
            continue
        s = score(p_interests, p_bio, q_interests, q_bio)
        if s > 0:
            scored.append((q_id, s))
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[: max(k, 0)]
