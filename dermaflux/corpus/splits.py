"""Leakage-free splits: grouped (lesion, patient, near-duplicate), stratified, seeded.

Rows sharing a lesion id or a patient id (within a namespace), or whose images are near
duplicates, form one group (union-find); a group lands in exactly one split. Groups are placed
greedily, largest first, into the split whose per-stratum counts are furthest below target.
Rows with an official split keep it; a free row whose group holds an official row follows it.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from dermaflux.corpus.schema import SPLITS

# When one group holds official rows of several splits, free rows join the most protected one.
PROTECTION = {"test": 2, "val": 1, "train": 0}


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_rows(keys: list[list[str]], pairs: list[tuple[int, int, int]]) -> list[int]:
    """Group id (the smallest row index in the group) per row. `keys[i]`: row i's grouping keys."""
    uf = UnionFind(len(keys))
    first_with_key: dict[str, int] = {}
    for row, row_keys in enumerate(keys):
        for key in row_keys:
            if key in first_with_key:
                uf.union(first_with_key[key], row)
            else:
                first_with_key[key] = row
    for i, j, _ in pairs:
        uf.union(i, j)
    return [uf.find(i) for i in range(len(keys))]


@dataclass
class SplitPlan:
    split: list[str]
    origin: list[str]  # official | dermaflux


def assign_splits(
    groups: list[int],
    strata: list[str],
    official: list[str | None],
    fractions: dict[str, float],
    seed: int,
    active: list[bool] | None = None,
) -> SplitPlan:
    """A split for every active row. `fractions` maps split -> share of the free rows."""
    n = len(groups)
    active = active or [True] * n
    members: dict[int, list[int]] = defaultdict(list)
    for row in range(n):
        members[groups[row]].append(row)
    split: list[str] = [""] * n
    origin: list[str] = [""] * n
    free_groups = []
    for group, rows in members.items():
        if not any(active[r] for r in rows):
            continue  # nothing to place (a test row dropped as overlap); not drawn, so the others' draw is unchanged
        pinned = {official[r] for r in rows if official[r] and active[r]}
        if not pinned:
            free_groups.append(group)
            continue
        follow = max(pinned, key=PROTECTION.__getitem__)
        for r in rows:
            split[r], origin[r] = (official[r], "official") if official[r] else (follow, "dermaflux")
    # Targets per stratum over the free, active rows only.
    stratum_total = Counter(strata[r] for g in free_groups for r in members[g] if active[r])
    target = {(s, k): fractions.get(s, 0.0) * total for k, total in stratum_total.items() for s in SPLITS}
    count: Counter = Counter()
    rng = random.Random(seed)
    rng.shuffle(free_groups)
    free_groups.sort(key=lambda g: -sum(active[r] for r in members[g]))  # stable: shuffled within a size
    for group in free_groups:
        group_strata = Counter(strata[r] for r in members[group] if active[r])

        def deficit(s: str) -> float:
            # How far below target this split is, in the group's strata, relative to the target.
            return sum(n_k * (target[s, k] - count[s, k]) / max(target[s, k], 1e-9) for k, n_k in group_strata.items()
                       if target[s, k] > 0) / max(sum(group_strata.values()), 1)

        candidates = [s for s in SPLITS if fractions.get(s, 0.0) > 0]
        best = max(candidates, key=lambda s: (deficit(s), fractions[s]))
        for k, n_k in group_strata.items():
            count[best, k] += n_k
        for r in members[group]:
            split[r], origin[r] = best, "dermaflux"
    return SplitPlan(split, origin)


def audit_splits(split: list[str], groups: list[int], pairs: list[tuple[int, int, int]],
                 ids: list[str], active: list[bool]) -> dict:
    """Leaks across splits among active rows: groups in several splits, near-duplicate pairs across splits."""
    by_group: dict[int, set[str]] = defaultdict(set)
    examples: dict[int, list[str]] = defaultdict(list)
    for row, group in enumerate(groups):
        if active[row] and split[row]:
            by_group[group].add(split[row])
            examples[group].append(ids[row])
    leaking = [g for g, s in by_group.items() if len(s) > 1]
    cross_pairs = [(ids[i], ids[j], d) for i, j, d in pairs
                   if active[i] and active[j] and split[i] and split[j] and split[i] != split[j]]
    return {
        "groups_across_splits": len(leaking),
        "rows_in_leaking_groups": sum(len(examples[g]) for g in leaking),
        "group_examples": [sorted(examples[g])[:5] for g in leaking[:10]],
        "near_duplicate_pairs_across_splits": len(cross_pairs),
        "pair_examples": [list(p) for p in cross_pairs[:10]],
    }
