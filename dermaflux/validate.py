"""Check a config before any stage starts: paths, preset, and resources the cluster can give.

A wrong path, an unknown preset or a GPU count no node (or no autoscaling node group) can
satisfy is reported up front, all problems at once, naming the config field — not an hour in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dermaflux.config import ConfigError, available_presets
from dermaflux.remote_paths import filesystem_for, is_remote, local_path
from dermaflux.stage_registry import get_stage

# Inputs a stage cannot run without (the others are optional: generate without adapters samples
# the base model, evaluate without a synthetic set runs the real-only grid).
REQUIRED_INPUTS = {("caption", "corpus"), ("train", "captions"), ("evaluate", "corpus")}

# Which earlier stage's output feeds an input field, for hints and for pipeline runs.
PRODUCED_BY = {
    ("caption", "corpus"): "curate",
    ("train", "captions"): "caption",
    ("generate", "adapters"): "train",
    ("evaluate", "corpus"): "curate",
    ("evaluate", "synthetic"): "generate",
}


@dataclass
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


def stage_demands(cfg, stage: str) -> list[Demand]:
    """The resource requests a stage will make, read from its config section."""
    spec = get_stage(stage)
    section = spec.section_of(cfg)
    if section is None:
        return []
    if stage == "train":
        bundle = {"CPU": float(section.cpus_per_worker)}
        if section.use_gpu:
            bundle["GPU"] = 1.0
        return [Demand(f"train.workers={section.workers} x {bundle}", bundle, section.workers, gang=True)]
    if stage == "generate":
        bundle = {"CPU": float(section.cpus_per_replica)}
        if section.gpus_per_replica:
            bundle["GPU"] = float(section.gpus_per_replica)
        # The offline job's actors run side by side but Ray Data starts with what fits.
        return [Demand(f"synth.generate_actors={section.generate_actors} x {bundle}", bundle, 1)]
    if stage == "evaluate":
        bundle = {"CPU": float(section.cpus_per_cell)}
        if section.gpus_per_cell:
            bundle["GPU"] = float(section.gpus_per_cell)
        return [Demand(f"evaluate cell {bundle}", bundle, 1)]
    if stage == "caption":
        bundle = {"CPU": float(section.cpus_per_actor)}
        if section.gpus_per_actor:
            bundle["GPU"] = float(section.gpus_per_actor)
        return [Demand(f"caption writer actor {bundle}", bundle, section.concurrency, gang=False),
                Demand("caption extraction task", {"CPU": float(section.extract_cpus)}, 1)]
    if stage == "curate":
        return [Demand("curate per-image task", {"CPU": float(section.cpus_per_worker)}, 1)]
    return []


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


def resource_problems(cfg, stages: list[str], capacity: Capacity) -> list[str]:
    problems = []
    for stage in stages:
        for demand in stage_demands(cfg, stage):
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


def _path_problem(field_path: str, value: str) -> str | None:
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


def _adapter_dir(item: str) -> str:
    """`NAME=DIR` (an adapter served under NAME) -> DIR; a plain folder or URI unchanged."""
    name, sep, rest = item.partition("=")
    return rest if sep and "/" not in name and ":" not in name else item


def path_problems(cfg, stages: list[str], produced: set[str] = frozenset()) -> list[str]:
    """Inputs that must exist now: those not made by an earlier stage of the same run."""
    problems = []
    for stage in stages:
        spec = get_stage(stage)
        section = spec.section_of(cfg)
        if section is None:
            problems.append(f"{stage}: not available in this install (no {spec.section} config section)")
            continue
        if getattr(section, spec.output, None) in (None, ""):
            problems.append(f"{spec.section}.{spec.output}: not set; give the output folder (--out or --set)")
        for name in spec.inputs:
            value = getattr(section, name, None)
            producer = PRODUCED_BY.get((stage, name))
            if producer in produced:
                continue
            field_path = f"{spec.section}.{name}"
            if value in (None, "", []):
                if (stage, name) in REQUIRED_INPUTS:
                    problems.append(f"{field_path}: not set; give the {producer} stage's output folder")
                continue
            for item in value if isinstance(value, list) else [value]:
                problem = _path_problem(field_path, _adapter_dir(item) if name == "adapters" else item)
                if problem:
                    problems.append(problem)
    if "curate" in stages and getattr(cfg, "curate", None) is not None:
        problems += curate_source_problems(cfg)
    return problems


def curate_source_problems(cfg) -> list[str]:
    """Each source's folder must exist (specs are `READER=PATH[,key=value...]`, see corpus.sources)."""
    problems = []
    for i, source in enumerate(getattr(cfg.curate, "sources", None) or []):
        head = str(source).split(",", 1)[0]
        path = head.split("=", 1)[1].strip() if "=" in head else ""
        if not path:
            problems.append(f"curate.sources[{i}]: {source!r} is not READER=PATH, e.g. ham10000=/data/ham10000")
            continue
        problem = _path_problem(f"curate.sources[{i}]", path)
        if problem:
            problems.append(problem)
    return problems


def model_problems(cfg) -> list[str]:
    problems = []
    if cfg.preset not in available_presets():
        problems.append(f"preset: unknown preset {cfg.preset!r}; available: {', '.join(available_presets())}")
    pretrained = cfg.model.pretrained
    looks_local = pretrained.startswith(("/", "./", "../", "~", "file://"))
    if looks_local and not Path(local_path(pretrained)).expanduser().exists():
        problems.append(f"model.pretrained: local model folder {pretrained} does not exist")
    return problems


def raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(
            f"config cannot run {what} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def check_config(cfg, stages: list[str], *, produced: set[str] = frozenset(), capacity: Capacity | None = None) -> None:
    """Raise ConfigError listing every problem, or return when the stages can start."""
    problems = model_problems(cfg) + path_problems(cfg, stages, produced)
    if capacity is not None:
        problems += resource_problems(cfg, stages, capacity)
    raise_problems(", ".join(stages), problems)


def check_stages_in_order(cfg, stages: list[str]) -> None:
    """A pipeline run: each stage's inputs may come from the stages before it; all problems at once."""
    problems = model_problems(cfg)
    produced: set[str] = set()
    for stage in stages:
        problems += path_problems(cfg, [stage], produced)
        produced.add(stage)
    raise_problems(", ".join(stages), problems)


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
