"""Shipped cluster configs: they parse, validate against their schemas, and agree with the presets."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from dermaflux.config import load_config
from dermaflux.checks import path_problems, resource_problems
from dermaflux.core.preflight import capacity_from_kuberay, capacity_from_launcher, ray_start_resources

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SCHEMAS = ROOT / "tests" / "data" / "kuberay"
IMAGE_ROOT = "/app"  # where cluster/Dockerfile puts the repo
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
MANIFESTS = {"raycluster.yaml": "raycluster", "rayjob-caption.yaml": "rayjob", "rayjob-train.yaml": "rayjob",
             "rayservice-synth.yaml": "rayservice"}
ALL_STAGES = ["curate", "caption", "train", "generate", "evaluate"]


@pytest.fixture(scope="module")
def flux_dev():
    return load_config("flux-dev")


def manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def in_repo(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_ROOT + "/"), f"{image_path} is not under the image's {IMAGE_ROOT}"
    return ROOT / image_path[len(IMAGE_ROOT) + 1:]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_rays_schema(name):
    ray_package = Path(importlib.util.find_spec("ray").origin).parent  # the schema file only; no Ray started
    schema = json.loads((ray_package / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0, "CPU head"


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_gpu_nodes_fit_flux_dev(name, flux_dev):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert resource_problems(flux_dev, ALL_STAGES, capacity_from_launcher(config)) == []
    gpu_types = {k: v for k, v in config["available_node_types"].items() if v["resources"].get("GPU")}
    assert gpu_types, "no GPU worker group"
    for node_type in gpu_types.values():
        # One node holds all train workers (one GPU each): NVLink inside a node, no cross-node ZeRO traffic.
        assert node_type["resources"]["GPU"] == flux_dev.train.workers
        assert node_type["resources"]["CPU"] >= flux_dev.train.workers * flux_dev.train.cpus_per_worker
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, "GPU groups autoscale from zero"


@pytest.mark.parametrize("name, kind", MANIFESTS.items())
def test_kuberay_manifest_validates_against_crd_schema(name, kind):
    schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    jsonschema.validate(manifest(name), schema)


def test_crd_schema_rejects_a_misspelt_field():
    schema = json.loads((SCHEMAS / "raycluster.schema.json").read_text())
    broken = manifest("raycluster.yaml")
    broken["spec"]["workerGroupSpec"] = broken["spec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(broken, schema)


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _groups(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("name", MANIFESTS)
def test_ray_resources_match_pod_resources(name):
    """rayStartParams must not promise Ray more CPUs/GPUs than the pod gets from Kubernetes."""
    for group in _groups(manifest(name)):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        ray_resources = ray_start_resources(group)
        assert ray_resources.get("GPU", 0) == float(limits.get("nvidia.com/gpu", 0)), group.get("groupName", "head")
        assert ray_resources.get("CPU", 0) <= float(limits["cpu"]), group.get("groupName", "head")


@pytest.mark.parametrize("name, stage", [("rayjob-caption.yaml", "caption"), ("rayjob-train.yaml", "train")])
def test_rayjob_runs_a_shipped_job_with_a_shipped_config(name, stage, flux_dev):
    doc = manifest(name)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and in_repo(argv[1]) == ROOT / "jobs" / f"{stage}.py"
    config_file = in_repo(argv[argv.index("--config") + 1])
    cfg = load_config(None, config_file)
    assert cfg.preset == "flux-dev"
    assert path_problems(cfg, [stage], produced={"curate", "caption"}) == []
    assert resource_problems(cfg, [stage], capacity_from_kuberay(_cluster_spec(doc))) == []
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def test_train_rayjob_gpus_equal_train_workers(flux_dev):
    spec = _cluster_spec(manifest("rayjob-train.yaml"))
    gpus = sum(ray_start_resources(g).get("GPU", 0) * g["replicas"] for g in spec["workerGroupSpecs"])
    assert flux_dev.train.use_gpu and gpus == flux_dev.train.workers


def test_rayservice_deployment_agrees_with_the_preset(flux_dev):
    doc = manifest("rayservice-synth.yaml")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = load_config(None, in_repo(app["args"]["config"]))
    synth = flux_dev.synth
    assert cfg.synth.gpus_per_replica == synth.gpus_per_replica and cfg.synth.autoscaling == synth.autoscaling
    from dermaflux.synth.serve_model import SYNTH_DEPLOYMENT

    (deployment,) = [d for d in app["deployments"] if d["name"] == SYNTH_DEPLOYMENT]
    assert deployment["ray_actor_options"] == {"num_cpus": synth.cpus_per_replica, "num_gpus": synth.gpus_per_replica}
    assert deployment["max_ongoing_requests"] == synth.max_ongoing_requests
    scaling = deployment["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (
        synth.autoscaling.min_replicas, synth.autoscaling.max_replicas, synth.autoscaling.target_ongoing_requests)
    capacity = capacity_from_kuberay(_cluster_spec(doc))
    assert capacity.total.get("GPU", 0) >= synth.autoscaling.max_replicas * synth.gpus_per_replica
    assert resource_problems(flux_dev, ["generate"], capacity) == []


def test_cluster_run_config_chains_the_stages():
    cfg = load_config(None, CLUSTER / "configs" / "flux-dev.yaml")
    assert cfg.caption.corpus == cfg.curate.out == cfg.evaluate.corpus
    assert cfg.train.captions == cfg.caption.out
    assert cfg.synth.adapters == [f"{cfg.train.out}/final"]
    assert cfg.evaluate.synthetic == cfg.synth.out


def test_caption_rayjob_gpus_equal_writer_actors(flux_dev):
    spec = _cluster_spec(manifest("rayjob-caption.yaml"))
    gpus = sum(ray_start_resources(g).get("GPU", 0) * g["replicas"] for g in spec["workerGroupSpecs"])
    assert gpus == flux_dev.caption.concurrency * flux_dev.caption.gpus_per_actor


def test_serve_app_builder_turns_serve_args_into_the_config(tmp_path):
    from dermaflux.synth.serve_app import AppArgs, config_from_args

    cfg = config_from_args(AppArgs.model_validate({"preset": "flux-dev", "set": "synth.autoscaling.max_replicas=2"}))
    assert cfg.preset == "flux-dev" and cfg.synth.autoscaling.max_replicas == 2 and cfg.model.cache_dir
    cfg = config_from_args(AppArgs.model_validate({"config": str(CLUSTER / "configs" / "flux-dev.yaml"),
                                                   "set": ["synth.port=9000"]}))
    assert cfg.synth.adapters == ["/mnt/dermaflux/train/final"] and cfg.synth.port == 9000


def test_serve_validates_the_builder_args_into_the_typed_model():
    # Ray Serve's own builder call (what `serve run` and a RayService use): it sees `app(args: AppArgs)`
    # and validates the raw dict into AppArgs, so a misspelt key stops the deploy naming that key.
    import pydantic
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from dermaflux.synth.serve_app import app

    with pytest.raises(pydantic.ValidationError, match="presett"):
        call_user_app_builder_with_args_if_necessary(app, {"presett": "flux-dev"})
    from dermaflux.core.config import ConfigError

    with pytest.raises(ConfigError, match="needs a bearer token"):  # typed args reached the builder
        call_user_app_builder_with_args_if_necessary(app, {
            "config": str(CLUSTER / "configs" / "flux-dev.yaml"), "set": "synth.auth.token_env=DERMAFLUX_UNSET_X"})
