"""What the cluster can give, what a stage asks of it, and the problems between the two; a path that
cannot be read. The ground floor of the preflight: no stage, no config section. The checks that
know the stages (`dermaflux.checks`) live beside the stage table and report through these.

A GPU count no node (or no autoscaling node group) can satisfy is reported up front, all problems
at once, naming the config field — not an hour in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dermaflux.core.config import ConfigError
from dermaflux.core.storage import filesystem_for, is_remote, local_path


@dataclass(frozen=True)
class Demand:
    """Resources one stage asks for: `bundles` copies of `bundle`, all at once when `gang`."""

    what: str
    bundle: dict[str, float]
    bundles: int = 1
    gang: bool = True


@dataclass
class Capacity:
    """What the cluster can give: the largest single node and the total, now or after autoscaling."""

    largest_node: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    source: str = ""


def capacity_from_ray() -> Capacity:
    """The connected cluster's alive nodes, plus the node groups its autoscaler may add."""
    import ray

    largest: dict[str, float] = {}
    total: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for key, value in node.get("Resources", {}).items():
            largest[key] = max(largest.get(key, 0.0), value)
            total[key] = total.get(key, 0.0) + value
    source = f"{sum(1 for n in ray.nodes() if n.get('Alive'))} alive Ray nodes"
    try:
        from ray._private.state import state

        cluster_config = state.get_cluster_config()
    except Exception:  # no autoscaler config (a plain local instance); a private API may move
        cluster_config = None
    if cluster_config is not None and cluster_config.node_group_configs:
        for group in cluster_config.node_group_configs:
            count = group.max_count if group.max_count >= 0 else 1_000_000
            for key, value in group.resources.items():
                largest[key] = max(largest.get(key, 0.0), float(value))
                total[key] = total.get(key, 0.0) + float(value) * count
        source += " and the autoscaler's node groups"
    return Capacity(largest, total, source)


def demand_problems(stage: str, demands: list[Demand], capacity: Capacity) -> list[str]:
    """A demand larger than the largest node, or (gang-scheduled) than the whole cluster."""
    problems = []
    for demand in demands:
        for key, amount in demand.bundle.items():
            if amount > capacity.largest_node.get(key, 0.0) + 1e-9:
                problems.append(
                    f"{stage}: {demand.what} needs {amount:g} {key} on one node, but the largest node has "
                    f"{capacity.largest_node.get(key, 0.0):g} ({capacity.source})"
                )
            need = amount * (demand.bundles if demand.gang else 1)
            if need > capacity.total.get(key, 0.0) + 1e-9:
                problems.append(
                    f"{stage}: {demand.what} needs {need:g} {key} at once, but the cluster has "
                    f"{capacity.total.get(key, 0.0):g} in all ({capacity.source})"
                )
    return problems


def path_problem(field_path: str, value: str) -> str | None:
    if is_remote(value):
        try:
            filesystem_for(value)  # the scheme is known; existence needs credentials and is checked by the job
        except ValueError as err:
            return f"{field_path}: {err}"
        return None
    path = Path(local_path(value)).expanduser()
    if not path.exists():
        return f"{field_path}: {value} does not exist"
    return None


def raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(
            f"config cannot run {what} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def _add_node(capacity: Capacity, resources: dict[str, float], count: int) -> None:
    for key, value in resources.items():
        capacity.largest_node[key] = max(capacity.largest_node.get(key, 0.0), float(value))
        capacity.total[key] = capacity.total.get(key, 0.0) + float(value) * count


def capacity_from_launcher(cluster_yaml: dict) -> Capacity:
    """What a Ray cluster launcher config can grow to: the head plus every node type at max_workers."""
    capacity = Capacity(source="cluster launcher config at max_workers")
    head = cluster_yaml.get("head_node_type")
    for name, node_type in cluster_yaml.get("available_node_types", {}).items():
        count = 1 if name == head else int(node_type.get("max_workers", 0))
        if count:
            _add_node(capacity, node_type.get("resources", {}), count)
    return capacity


def ray_start_resources(group: dict) -> dict[str, float]:
    """The Ray resources a KubeRay group's pods register (rayStartParams num-cpus / num-gpus)."""
    params = group.get("rayStartParams", {})
    resources = {}
    if "num-cpus" in params:
        resources["CPU"] = float(params["num-cpus"])
    if "num-gpus" in params:
        resources["GPU"] = float(params["num-gpus"])
    return resources


def capacity_from_kuberay(cluster_spec: dict) -> Capacity:
    """What a KubeRay RayCluster spec can grow to: the head plus every worker group at maxReplicas."""
    capacity = Capacity(source="KubeRay cluster spec at maxReplicas")
    _add_node(capacity, ray_start_resources(cluster_spec["headGroupSpec"]), 1)
    for group in cluster_spec.get("workerGroupSpecs", []):
        _add_node(capacity, ray_start_resources(group), int(group.get("maxReplicas", 0)) * int(group.get("numOfHosts", 1)))
    return capacity
