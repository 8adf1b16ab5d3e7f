"""Ports picked for one Ray node are all distinct, whatever `random` was seeded with."""

from __future__ import annotations

import random

from dermaflux.core.runtime import free_port


def test_free_port_never_repeats_within_a_process_even_after_reseeding():
    picked = []
    for _ in range(300):
        random.seed(0)  # a seeded global generator once made two components of one node pick the same port
        picked.append(free_port())
    assert len(set(picked)) == len(picked)
    assert all(20000 <= port <= 32000 for port in picked)

