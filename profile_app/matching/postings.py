"""The building blocks of MatchIndex: token bytes, a growing vocabulary, growable arrays
and the merge of posting lists."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Fast equivalent of _TOKEN_RE.findall on an already lower-cased str, on its UTF-8
# bytes: [a-z0-9] are exactly the single bytes 0x30-0x39 and 0x61-0x7a, and every other
# code point (any non-ASCII one included) encodes to bytes outside those ranges, which
# this table turns into spaces. Tokens come out as bytes (ASCII) instead of str.
SEPARATE = bytes(c if (48 <= c <= 57 or 97 <= c <= 122) else 32 for c in range(256))

# A raw score that is this much below the k-th best raw score cannot round
# (to 6 decimals, i.e. by at most 5e-7) to a value >= the k-th best rounded score.
MARGIN = 1e-6


def token_bytes(bio: str) -> list[bytes]:
    """``tokenize(bio)``, as ASCII bytes (about twice as fast)."""
    return bio.lower().encode("utf-8", "surrogatepass").translate(SEPARATE).split()


class Vocab(dict):
    """Key -> dense id, assigning the next id to unseen keys."""

    def __missing__(self, key: object) -> int:
        value = self[key] = len(self)
        return value


class Grow:
    """A numpy array with amortised O(1) append."""

    __slots__ = ("a", "n")

    def __init__(self, dtype: type, initial: Sequence[float] = ()) -> None:
        self.a = np.empty(max(16, len(initial)), dtype)
        self.n = len(initial)
        self.a[: self.n] = initial

    def extend(self, xs: np.ndarray) -> None:
        k = xs.shape[0]
        need = self.n + k
        if need > self.a.shape[0]:
            new = np.empty(max(need, 2 * self.a.shape[0]), self.a.dtype)
            new[: self.n] = self.a[: self.n]
            self.a = new
        self.a[self.n : need] = xs
        self.n = need

    def view(self) -> np.ndarray:
        return self.a[: self.n]

    def replace(self, arr: np.ndarray) -> None:
        self.a = np.array(arr, dtype=self.a.dtype)
        self.n = self.a.shape[0]
        if self.n == 0:
            self.a = np.empty(16, self.a.dtype)


def merge_postings(
    ptr: np.ndarray,
    rows: np.ndarray,
    vals: np.ndarray | None,
    d_keys: np.ndarray,
    d_rows: np.ndarray,
    d_vals: np.ndarray | None,
    n_keys: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge key-grouped postings (``ptr``/``rows``/``vals``) with ungrouped new ones.

    Within a key the old postings come first. The old postings are not re-sorted.
    """
    # Stable sort of the new postings by key: sort (key << 32 | position).
    packed = (d_keys.astype(np.int64) << 32) | np.arange(d_keys.shape[0], dtype=np.int64)
    packed.sort()
    order = packed & 0xFFFFFFFF
    d_keys = packed >> 32
    b_counts = np.zeros(n_keys, np.int64)
    b_counts[: ptr.shape[0] - 1] = np.diff(ptr)
    d_counts = np.bincount(d_keys, minlength=n_keys)
    new_ptr = np.zeros(n_keys + 1, np.int64)
    np.cumsum(b_counts + d_counts, out=new_ptr[1:])

    # Old posting i with key t lands after the new postings of keys < t;
    # new posting j with key t lands after the old postings of keys <= t.
    d_before = np.zeros(n_keys, np.int64)
    np.cumsum(d_counts[:-1], out=d_before[1:])
    b_pos = np.repeat(d_before, b_counts)
    b_pos += np.arange(b_pos.shape[0], dtype=np.int64)
    d_pos = np.cumsum(b_counts)[d_keys]
    d_pos += np.arange(d_pos.shape[0], dtype=np.int64)

    total = int(new_ptr[-1])
    new_rows = np.empty(total, np.int32)
    new_rows[b_pos] = rows
    new_rows[d_pos] = d_rows[order]
    new_vals = None
    if vals is not None and d_vals is not None:
        new_vals = np.empty(total, vals.dtype)
        new_vals[b_pos] = vals
        new_vals[d_pos] = d_vals[order]
    return new_ptr, new_rows, new_vals
