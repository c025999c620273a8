"""MatchIndex: the same answers as the reference oracle (bit-identical floats, same order)
with cost proportional to the postings shared with the profile.

Pure: imports only the standard library and numpy.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from profile_app.matching.postings import MARGIN, Grow, Vocab, merge_postings, token_bytes


class MatchIndex:
    """An in-memory index of all profiles, updated incrementally.

    Rows are append-only. ``upsert`` appends the profile's token ids to a pending
    buffer and tombstones the user's previous row; before a query the pending rows
    are counted and moved (vectorised) into a row-major store (CSR). Queries use a
    token-major inverted index (CSC) over the "base" rows, plus a scan of the CSR of
    the "delta" rows appended since the last merge. The delta is merged, and the
    tombstones compacted, lazily by ``top_matches`` once they pass a fraction of the
    index, so upserts stay cheap. Not thread-safe.
    """

    def __init__(
        self,
        profiles: Iterable[tuple[str, Sequence[str], str]] = (),
        *,
        merge_min: int = 512,
        compact_min: int = 1024,
    ) -> None:
        """Optionally start from ``(user_id, interests, bio)`` triples.

        The delta is merged once it has more than max(merge_min, base rows / 16) rows, and
        tombstones compacted once more than max(compact_min, rows / 4) rows are dead.
        """
        self._merge_min = merge_min
        self._compact_min = compact_min
        self._uid_to_row: dict[str, int] = {}
        self._row_uid: list[str | None] = []
        self._alive = bytearray()
        self._n_dead = 0
        self._tok_vocab = Vocab()
        self._int_vocab = Vocab()
        # Rows not yet counted: raw token ids (with repeats), unique interest ids.
        self._p_tok = array("i")
        self._p_tok_len = array("q")
        self._p_int = array("i")
        self._p_int_len = array("q")
        # Row-major store of the counted rows.
        self._tok_ptr = Grow(np.int64, [0])
        self._tok_ids = Grow(np.int32)
        self._tok_cnt = Grow(np.int32)
        self._int_ptr = Grow(np.int64, [0])
        self._int_ids = Grow(np.int32)
        self._norm = Grow(np.float64)  # sqrt(sum of squared token counts)
        self._nint = Grow(np.float64)  # size of the interest set
        # Token-major inverted index over rows [0, _base_rows).
        self._base_rows = 0
        self._ct_ptr = np.zeros(1, np.int64)
        self._ct_rows = np.zeros(0, np.int32)
        self._ct_cnt = np.zeros(0, np.int32)
        self._ci_ptr = np.zeros(1, np.int64)
        self._ci_rows = np.zeros(0, np.int32)
        self._scratch = np.zeros(0, np.float64)
        for user_id, interests, bio in profiles:
            self.upsert(user_id, interests, bio)

    # ------------------------------------------------------------------ updates

    def upsert(self, user_id: str, interests: Sequence[str], bio: str) -> None:
        """Insert or replace the profile of ``user_id`` (amortised O(profile size))."""
        toks = token_bytes(bio)
        names = {i.strip().lower() for i in interests}
        tok_ids = list(map(self._tok_vocab.__getitem__, toks))
        int_ids = list(map(self._int_vocab.__getitem__, names))
        old = self._uid_to_row.get(user_id)
        if old is not None:
            self._kill(old)
        self._uid_to_row[user_id] = len(self._row_uid)
        self._row_uid.append(user_id)
        self._alive.append(1)
        self._p_tok.fromlist(tok_ids)
        self._p_tok_len.append(len(tok_ids))
        self._p_int.fromlist(int_ids)
        self._p_int_len.append(len(int_ids))

    def remove(self, user_id: str) -> bool:
        """Forget ``user_id``; returns whether it was present."""
        row = self._uid_to_row.pop(user_id, None)
        if row is None:
            return False
        self._kill(row)
        return True

    def _kill(self, row: int) -> None:
        self._alive[row] = 0
        self._row_uid[row] = None
        self._n_dead += 1

    def __len__(self) -> int:
        return len(self._uid_to_row)

    def __contains__(self, user_id: object) -> bool:
        try:
            return user_id in self._uid_to_row
        except TypeError:
            return False

    # ------------------------------------------------------------ maintenance

    def settle(self) -> None:
        """Count the pending rows and merge them if due, as the next query would: after a
        bulk load, the build is paid here and its temporaries are freed before any query."""
        self._maybe_merge()

    def _flush(self) -> None:
        """Count the pending rows' tokens and append them to the row-major store."""
        n_new = len(self._p_tok_len)
        if not n_new:
            return
        p_tok, p_tok_len = self._p_tok, self._p_tok_len
        p_int, p_int_len = self._p_int, self._p_int_len
        self._p_tok, self._p_tok_len = array("i"), array("q")
        self._p_int, self._p_int_len = array("i"), array("q")

        lens = np.frombuffer(p_tok_len, np.int64)
        local_row = np.repeat(np.arange(n_new, dtype=np.int64), lens)
        keys = (local_row << 32) | np.frombuffer(p_tok, np.int32).astype(np.int64)
        uniq, counts = np.unique(keys, return_counts=True)
        u_row = uniq >> 32
        per_row = np.bincount(u_row, minlength=n_new)
        sq = np.bincount(u_row, weights=counts.astype(np.float64) ** 2, minlength=n_new)
        self._norm.extend(np.sqrt(sq))  # exact integer sums; IEEE sqrt == math.sqrt
        self._tok_ptr.extend(self._tok_ids.n + np.cumsum(per_row))
        self._tok_ids.extend((uniq & 0xFFFFFFFF).astype(np.int32))
        self._tok_cnt.extend(counts.astype(np.int32))

        ilens = np.frombuffer(p_int_len, np.int64)
        self._nint.extend(ilens.astype(np.float64))
        self._int_ptr.extend(self._int_ids.n + np.cumsum(ilens))
        self._int_ids.extend(np.frombuffer(p_int, np.int32))

    def _maybe_merge(self) -> None:
        self._flush()
        n_rows = len(self._row_uid)
        if self._n_dead > max(self._compact_min, n_rows // 4):
            self._compact()
            self._merge()
        elif n_rows - self._base_rows > max(self._merge_min, self._base_rows // 16):
            self._merge()

    def _compact(self) -> None:
        """Drop tombstoned rows from the (flushed) row store and the base postings."""
        alive = np.frombuffer(bytes(self._alive), np.bool_)
        remap = np.cumsum(alive, dtype=np.int64) - 1
        n_alive = int(alive.sum())

        for ptr, cols in (
            (self._tok_ptr, (self._tok_ids, self._tok_cnt)),
            (self._int_ptr, (self._int_ids,)),
        ):
            lens = np.diff(ptr.view())
            keep = np.repeat(alive, lens)
            for col in cols:
                col.replace(col.view()[keep])
            new_ptr = np.zeros(n_alive + 1, np.int64)
            np.cumsum(lens[alive], out=new_ptr[1:])
            ptr.replace(new_ptr)

        self._ct_ptr, self._ct_rows, self._ct_cnt = self._compact_postings(
            alive, remap, self._ct_ptr, self._ct_rows, self._ct_cnt
        )
        self._ci_ptr, self._ci_rows, _ = self._compact_postings(
            alive, remap, self._ci_ptr, self._ci_rows, None
        )
        self._base_rows = int(alive[: self._base_rows].sum())
        self._norm.replace(self._norm.view()[alive])
        self._nint.replace(self._nint.view()[alive])
        self._row_uid = [u for u in self._row_uid if u is not None]
        self._uid_to_row = {u: r for r, u in enumerate(self._row_uid)}
        self._alive = bytearray(b"\x01" * n_alive)
        self._n_dead = 0

    @staticmethod
    def _compact_postings(
        alive: np.ndarray,
        remap: np.ndarray,
        ptr: np.ndarray,
        rows: np.ndarray,
        vals: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        keep = alive[rows]
        n_keys = ptr.shape[0] - 1
        keys = np.repeat(np.arange(n_keys), np.diff(ptr))[keep]
        new_ptr = np.zeros(n_keys + 1, np.int64)
        np.cumsum(np.bincount(keys, minlength=n_keys), out=new_ptr[1:])
        new_vals = None if vals is None else vals[keep]
        return new_ptr, remap[rows[keep]].astype(np.int32), new_vals

    def _merge(self) -> None:
        """Move the (flushed) delta rows into the token-major base postings."""
        b = self._base_rows
        n_rows = len(self._row_uid)
        if n_rows == b:
            return
        tp = self._tok_ptr.view()
        t0 = int(tp[b])
        d_rows = np.repeat(np.arange(b, n_rows, dtype=np.int32), np.diff(tp[b:]))
        self._ct_ptr, self._ct_rows, self._ct_cnt = merge_postings(
            self._ct_ptr,
            self._ct_rows,
            self._ct_cnt,
            self._tok_ids.view()[t0:],
            d_rows,
            self._tok_cnt.view()[t0:],
            len(self._tok_vocab),
        )
        ip = self._int_ptr.view()
        i0 = int(ip[b])
        d_rows = np.repeat(np.arange(b, n_rows, dtype=np.int32), np.diff(ip[b:]))
        self._ci_ptr, self._ci_rows, _ = merge_postings(
            self._ci_ptr,
            self._ci_rows,
            None,
            self._int_ids.view()[i0:],
            d_rows,
            None,
            len(self._int_vocab),
        )
        self._base_rows = n_rows

    # ---------------------------------------------------------------- queries

    def _accumulate(
        self,
        q_ids: np.ndarray,
        q_w: np.ndarray | None,
        ptr: np.ndarray,
        rows: np.ndarray,
        vals: np.ndarray | None,
        row_ptr: np.ndarray,
        row_ids: np.ndarray,
        row_vals: np.ndarray | None,
        n_vocab: int,
    ) -> np.ndarray:
        """Per row, the sum over shared keys t of q_w[t] * val[t] (exact integers)."""
        n_rows = row_ptr.shape[0] - 1
        # Base rows: concatenate the posting lists of the query's keys, one bincount.
        in_base = q_ids < ptr.shape[0] - 1
        starts = ptr[q_ids[in_base]].tolist()
        ends = ptr[q_ids[in_base] + 1].tolist()
        if sum(ends) > sum(starts):
            cat_rows = np.concatenate([rows[s:e] for s, e in zip(starts, ends, strict=True)])
            if vals is None:
                acc = np.bincount(cat_rows, minlength=n_rows).astype(np.float64)
            else:
                lens = np.subtract(ends, starts)
                w = np.concatenate([vals[s:e] for s, e in zip(starts, ends, strict=True)])
                acc = np.bincount(cat_rows, weights=w * np.repeat(q_w[in_base], lens), minlength=n_rows)
        else:
            acc = np.zeros(n_rows, np.float64)
        # Delta rows: look every posting of the row-major store up in a dense table.
        p0 = int(row_ptr[self._base_rows])
        if p0 < row_ids.shape[0]:
            if self._scratch.shape[0] < n_vocab:
                self._scratch = np.zeros(max(n_vocab, 2 * self._scratch.shape[0]))
            table = self._scratch
            table[q_ids] = 1.0 if q_w is None else q_w
            try:
                w = table[row_ids[p0:]]
            finally:
                table[q_ids] = 0.0
            hit = np.flatnonzero(w)
            if hit.shape[0]:
                w = w[hit]
                if row_vals is not None:
                    w *= row_vals[p0:][hit]
                hit_rows = np.searchsorted(row_ptr, hit + p0, side="right") - 1
                acc += np.bincount(hit_rows, weights=w, minlength=n_rows)
        return acc

    def top_matches(
        self,
        user_id: str,
        k: int = 10,
        progress: Callable[[float], None] | None = None,
    ) -> list[tuple[str, float]]:
        """Top-``k`` matches of ``user_id``, identical to :func:`reference_matches`.

        Raises KeyError if ``user_id`` is unknown. ``progress``, if given, is called a
        few times with the fraction done (0.0 .. 1.0).
        """
        self._uid_to_row[user_id]  # KeyError for an unknown user, before any work
        if k <= 0:
            return []
        if progress is not None:
            progress(0.0)
        self._maybe_merge()
        row = self._uid_to_row[user_id]  # compaction may have renumbered rows

        tp = self._tok_ptr.view()
        q_tok = self._tok_ids.a[tp[row] : tp[row + 1]]
        q_cnt = self._tok_cnt.a[tp[row] : tp[row + 1]].astype(np.float64)
        ip = self._int_ptr.view()
        q_int = self._int_ids.a[ip[row] : ip[row + 1]]

        dot = self._accumulate(
            q_tok,
            q_cnt,
            self._ct_ptr,
            self._ct_rows,
            self._ct_cnt,
            tp,
            self._tok_ids.view(),
            self._tok_cnt.view(),
            len(self._tok_vocab),
        )
        if progress is not None:
            progress(0.6)
        inter = self._accumulate(
            q_int,
            None,
            self._ci_ptr,
            self._ci_rows,
            None,
            ip,
            self._int_ids.view(),
            None,
            len(self._int_vocab),
        )
        if progress is not None:
            progress(0.8)

        mask = (dot > 0) | (inter > 0)
        mask &= np.frombuffer(bytes(self._alive), np.bool_)
        mask[row] = False
        cand = np.flatnonzero(mask)

        # The same float operations, in the same order, as score().
        d = dot[cand]
        it = inter[cand]
        union = float(q_int.shape[0]) + self._nint.view()[cand] - it
        jaccard = np.zeros(cand.shape[0])
        np.divide(it, union, out=jaccard, where=it > 0)
        cosine = np.zeros(cand.shape[0])
        q_norm = float(self._norm.a[row])
        if q_norm > 0:
            np.divide(d, q_norm * self._norm.view()[cand], out=cosine, where=d > 0)
        raw = 0.5 * jaccard + 0.5 * cosine

        result = self._select(cand, raw, k)
        if progress is not None:
            progress(1.0)
        return result

    def _select(self, cand: np.ndarray, raw: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Round with Python's round() and pick the top k by (-score, user_id)."""
        if cand.shape[0] > k:
            # round() is monotone and moves a value by at most 5e-7, so nothing more
            # than MARGIN below the k-th raw score can reach the k-th rounded score.
            kth = np.partition(raw, -k)[-k]
            keep = raw >= kth - MARGIN
            cand = cand[keep]
            raw = raw[keep]
        # Equal raw scores round equally: round each distinct value once.
        uniq, inv = np.unique(raw, return_inverse=True)
        rounded = np.array([round(x, 6) for x in uniq.tolist()], np.float64)[inv]
        positive = rounded > 0
        cand = cand[positive]
        rounded = rounded[positive]
        uids = self._row_uid
        if cand.shape[0] > k:
            kth = np.partition(rounded, -k)[-k]
            above = rounded > kth
            tied = cand[rounded == kth].tolist()
            top = zip(cand[above].tolist(), rounded[above].tolist(), strict=True)
            pairs = [(uids[r], s) for r, s in top]
            kth_score = float(kth)
            need = k - len(pairs)
            pairs.extend((u, kth_score) for u in heapq.nsmallest(need, [uids[r] for r in tied]))
        else:
            pairs = [(uids[r], s) for r, s in zip(cand.tolist(), rounded.tolist(), strict=True)]
        pairs.sort(key=lambda item: (-item[1], item[0]))
        return pairs
