"""The T5 length a run trains at, from its captions' token counts (pure; the tokenizer is passed in).

T5 pads every caption to the length it is encoded at, and the transformer attends over all of those
tokens: FLUX.1-dev at 512 tokens spends a third of its sequence on padding for 150-token captions
(a training step at 128 tokens ran 1.27x faster than at 512 on an H200, issue 11). So the pre-compute
counts every caption's tokens once and encodes at the smallest bucket that holds the longest one.
A caption longer than the budget is an error naming its id: FluxPipeline would cut it silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

TEXT_TOKEN_BUCKETS = (64, 128, 256, 512)


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """T5 tokens of each text as FluxPipeline encodes it (with the end-of-sequence token, before padding)."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=True, padding=False, truncation=False)
    return [len(ids) for ids in encoded["input_ids"]]


def bucket_for(tokens: int, limit: int, buckets: tuple[int, ...] = TEXT_TOKEN_BUCKETS) -> int:
    """The smallest of `buckets` that holds `tokens`, at most `limit` (model.max_sequence_length); else `limit`."""
    return next((b for b in sorted(buckets) if tokens <= b <= limit), limit)


def pick_text_tokens(counts: Iterable[tuple[str, int]], limit: int, setting: int | str = "auto",
                     buckets: tuple[int, ...] = TEXT_TOKEN_BUCKETS) -> dict:
    """{"length", "max", "p99", "texts"} for `counts` (pairs of (text id, tokens)).

    `setting` "auto": the smallest bucket holding the longest text, at most `limit`
    (model.max_sequence_length), or `limit` itself when no bucket below it does; an int: that length.
    Raises ValueError naming the texts (up to 5) that do not fit.
    """
    pairs = list(counts)
    if not pairs:
        raise ValueError("no captions to count T5 tokens of")
    if setting != "auto" and setting > limit:
        raise ValueError(f"train.text_tokens {setting} exceeds model.max_sequence_length {limit}")
    longest = max(n for _, n in pairs)
    budget = limit if setting == "auto" else int(setting)
    too_long = [(text_id, n) for text_id, n in pairs if n > budget]
    if too_long:
        named = ", ".join(f"{text_id} ({n} tokens)" for text_id, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        field = "model.max_sequence_length" if setting == "auto" else "train.text_tokens"
        raise ValueError(f"{len(too_long)} caption(s) longer than the T5 budget of {budget} tokens ({field}): "
                         f"{named}{more}; shorten them or raise {field}")
    if setting == "auto":
        length = bucket_for(longest, limit, buckets)
    else:
        length = int(setting)
    counts_only = np.asarray([n for _, n in pairs])
    return {"length": length, "max": int(longest), "p99": int(math.ceil(np.percentile(counts_only, 99))),
            "texts": len(pairs)}
