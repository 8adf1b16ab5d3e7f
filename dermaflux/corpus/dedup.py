"""Near-duplicate detection on perceptual hashes, and which copy of each duplicate to keep.

Two searches that return the same pairs: `near_pairs`, an exact blocked all-pairs Hamming scan
(numpy popcount, quadratic: about 30M pairs/s, 10 s for 40k hashes), kept as the oracle; and
`indexed_near_pairs`, multi-index hashing (Norouzi et al., "Fast exact search in Hamming space
with multi-index hashing", TPAMI 2014) through faiss's `IndexBinaryMultiHash`. Split the code into
m disjoint substrings: two codes within distance r differ in at most floor(r/m) bits of at least
one of them (pigeonhole), so looking up every code within `nflip = floor(r/m)` flips of each
substring finds every pair; the exact distance of each candidate then filters. Exact, not
approximate: tests/unit/test_corpus_dedup.py checks both give identical pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np


def hash_words(phashes: list[str]) -> np.ndarray:
    """Hex hashes (all the same length) -> (n, words) uint64 for popcount distances."""
    if not phashes:
        return np.zeros((0, 1), dtype=np.uint64)
    lengths = {len(h) for h in phashes}
    if len(lengths) != 1:
        raise ValueError(f"perceptual hashes of different lengths {sorted(lengths)}: were they made with one hash_size?")
    width = -(-lengths.pop() // 16) * 16
    # One bytes.fromhex over the whole column: a per-hash int() loop takes seconds at 500k.
    packed = bytes.fromhex("".join(h.rjust(width, "0") for h in phashes))
    return np.frombuffer(packed, dtype=">u8").astype(np.uint64).reshape(len(phashes), width // 16)


def near_pairs(words: np.ndarray, threshold: int, block: int = 1024) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= threshold."""
    pairs: list[tuple[int, int, int]] = []
    n = len(words)
    for start in range(0, n, block):
        rows = words[start:start + block]
        # Only columns j > i: compare this block with itself and everything after it.
        cols = words[start:]
        dist = np.zeros((len(rows), len(cols)), dtype=np.uint16)
        for k in range(words.shape[1]):
            dist += np.bitwise_count(rows[:, k][:, None] ^ cols[:, k][None, :]).astype(np.uint16)
        i_idx, j_idx = np.nonzero(dist <= threshold)
        for i, j in zip(i_idx.tolist(), j_idx.tolist()):
            if j > i:
                pairs.append((start + i, start + j, int(dist[i, j])))
    return pairs


# Below this many hashes the exact scan is as fast as building an index.
INDEX_MIN_ROWS = 4096
# Hash-table keys wider than this spread the codes over more buckets than there are codes.
MAX_KEY_BITS = 32
QUERY_CHUNK = 65536  # queries per range search: bounds the result buffers


def varying_bits(words: np.ndarray) -> tuple[np.ndarray, int]:
    """(n, bytes) uint8 codes holding only the bit positions that differ somewhere in `words`, and
    how many such bits there are (the codes' tail is zero padding).

    A bit equal in every hash adds nothing to any distance: dropping it keeps every distance and
    keeps the padding of short hashes (and bits a source never sets) out of the hash tables,
    where they would put every code into one bucket."""
    as_bytes = words.astype(">u8").view(np.uint8).reshape(len(words), words.shape[1] * 8)  # -1 fails at 0 rows
    if not len(words):
        return as_bytes, 0
    always_set = np.unpackbits(np.bitwise_and.reduce(as_bytes, axis=0))
    ever_set = np.unpackbits(np.bitwise_or.reduce(as_bytes, axis=0))
    keep = np.flatnonzero(ever_set & ~always_set & 1)
    codes = np.concatenate([np.packbits(np.unpackbits(as_bytes[s:s + QUERY_CHUNK], axis=1)[:, keep], axis=1)
                            for s in range(0, len(words), QUERY_CHUNK)])
    return codes, len(keep)


def index_shape(bits: int, threshold: int, rows: int) -> tuple[int, int, int] | None:
    """(tables, key bits, flips) with the fewest expected lookups + candidates per query, or None
    when no split of `bits` into disjoint keys can guarantee every pair (then scan exactly)."""
    best = None
    for flips in range(4):
        tables = threshold // (flips + 1) + 1  # pigeonhole: some table differs in <= flips bits
        key_bits = min(bits // tables, MAX_KEY_BITS)
        if key_bits < 1 or flips > key_bits:
            continue
        lookups = sum(comb(key_bits, k) for k in range(flips + 1))
        cost = tables * lookups * (1 + rows / 2 ** key_bits)
        if best is None or cost < best[0]:
            best = (cost, tables, key_bits, flips)
    return None if best is None else best[1:]


def indexed_near_pairs(words: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """The pairs of `near_pairs`, in the same order, without comparing every pair (multi-index hashing)."""
    codes, bits = varying_bits(words)
    shape = index_shape(bits, threshold, len(words))
    if len(words) < INDEX_MIN_ROWS or shape is None:
        return near_pairs(words, threshold)
    import faiss

    tables, key_bits, flips = shape
    index = faiss.IndexBinaryMultiHash(codes.shape[1] * 8, tables, key_bits)
    index.nflip = flips
    index.add(codes)
    found = []
    for start in range(0, len(codes), QUERY_CHUNK):
        # faiss's binary range search keeps distances strictly below the radius.
        limits, distances, labels = index.range_search(codes[start:start + QUERY_CHUNK], threshold + 1)
        queries = np.repeat(np.arange(start, start + len(limits) - 1), np.diff(limits.astype(np.int64)))
        later = labels > queries  # each pair once, as (i, j) with i < j; drops the self match
        found.append(np.stack([queries[later], labels[later], distances[later]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return [(int(i), int(j), int(d)) for i, j, d in pairs]


@dataclass
class DedupResult:
    kept: np.ndarray  # bool per row
    duplicate_of: np.ndarray  # index of the kept row a dropped row duplicates, -1 when kept
    distance: np.ndarray  # Hamming distance to that row, -1 when kept


def choose_kept(n: int, pairs: list[tuple[int, int, int]], priority: list[int]) -> DedupResult:
    """Walk rows best-first (`priority` is an order of row indices); a row within the threshold of
    a row already kept is dropped as its duplicate. Greedy, not connected components: a chain
    A~B~C with A and C far apart keeps both A and C."""
    neighbours: dict[int, list[tuple[int, int]]] = {}
    for i, j, d in pairs:
        neighbours.setdefault(i, []).append((j, d))
        neighbours.setdefault(j, []).append((i, d))
    kept = np.zeros(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, -1, dtype=np.int64)
    for row in priority:
        closest = min(((d, other) for other, d in neighbours.get(row, []) if kept[other]), default=None)
        if closest is None:
            kept[row] = True
        else:
            distance[row], duplicate_of[row] = closest
    return DedupResult(kept, duplicate_of, distance)
