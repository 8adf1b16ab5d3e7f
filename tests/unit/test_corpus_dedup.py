"""The indexed near-duplicate search against the exact scan, its oracle (no Ray)."""

import numpy as np
import pytest

from dermaflux.corpus import dedup


def _hexes(bits: np.ndarray) -> list[str]:
    width = bits.shape[1]
    padded = np.concatenate([np.zeros((len(bits), -width % 8), dtype=np.uint8), bits], axis=1)
    return [bytes(row).hex()[len(row) * 2 - -(-width // 4):] for row in np.packbits(padded, axis=1)]


def _planted(rng, rows: int, width: int, threshold: int, clustered: bool):
    """Random hashes with copies planted at every distance from 0 to threshold + 2 of a random base.
    `clustered`: most bits shared by every hash, as in a set of similar images."""
    bits = rng.integers(0, 2, (rows, width), dtype=np.uint8)
    if clustered:
        bits[:, : width // 2] = 0
    planted = {}
    for k, distance in enumerate(list(range(threshold + 3)) * 3):
        base, copy = 2 * k, 2 * k + 1
        bits[copy] = bits[base]
        flip = rng.choice(np.arange(width // 2 if clustered else 0, width), distance, replace=False)
        bits[copy, flip] ^= 1
        planted[(base, copy)] = distance
    return bits, planted


@pytest.mark.parametrize(("width", "threshold", "clustered"), [(256, 24, False), (256, 24, True), (64, 6, False),
                                                               (25, 3, False)])
def test_index_and_exact_scan_give_identical_pairs(width, threshold, clustered):
    rng = np.random.default_rng(width + threshold)
    bits, planted = _planted(rng, 6000, width, threshold, clustered)
    words = dedup.hash_words(_hexes(bits))
    assert len(words) >= dedup.INDEX_MIN_ROWS and dedup.index_shape(width, threshold, len(words)) is not None
    exact = dedup.near_pairs(words, threshold)
    indexed = dedup.indexed_near_pairs(words, threshold)
    assert indexed == exact
    found = {(i, j): d for i, j, d in indexed}
    for pair, distance in planted.items():
        if distance <= threshold:
            assert found[pair] == distance
        else:
            assert pair not in found


def test_hash_words_keeps_every_distance():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, (50, 256), dtype=np.uint8)
    words = dedup.hash_words(_hexes(bits))
    assert words.shape == (50, 4) and words.dtype == np.uint64
    for i, j in [(0, 1), (3, 40), (7, 7)]:
        assert int(sum(np.bitwise_count(words[i] ^ words[j]))) == int((bits[i] != bits[j]).sum())
    with pytest.raises(ValueError, match="different lengths"):
        dedup.hash_words(["ab", "abc"])


def test_bits_equal_in_every_hash_leave_the_codes():
    words = np.array([[0b1010], [0b1000], [0b0010]], dtype=np.uint64)
    codes, bits = dedup.varying_bits(words)
    assert bits == 2 and codes.shape == (3, 1)
    assert [int(c[0]) >> 6 for c in codes] == [0b11, 0b10, 0b01]  # the two varying bits, first in the byte


def test_no_index_where_no_split_can_guarantee_every_pair():
    assert dedup.index_shape(bits=8, threshold=40, rows=10**6) is None
    tables, key_bits, flips = dedup.index_shape(bits=256, threshold=24, rows=500_000)
    assert tables * (flips + 1) > 24 and tables * key_bits <= 256


@pytest.mark.parametrize("rows", [0, 1])
def test_no_pairs_from_no_or_one_hash(rows):
    # A curate whose every image was quarantined dedups zero hashes: no pairs, not a reshape error.
    words = dedup.hash_words(["f0e1d2c3b4a59687"] * rows)
    assert dedup.indexed_near_pairs(words, 10) == [] == dedup.near_pairs(words, 10)
