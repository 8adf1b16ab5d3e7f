"""The Ray Serve application of the synthesis service: built from a config, started, served.

- `app(args: AppArgs)`: the typed application builder a RayService's `serveConfigV2` (or
  `serve run`) imports; Serve validates its `args` against `AppArgs` (unknown keys refused).
- `build_app`: the synthesis deployment (`serve_model.SynthesisModel`) behind the HTTP ingress
  (`serve_api.SynthesisAPI`, which runs bulk jobs through `serve_jobs`), with replicas,
  autoscaling, resources and ingress bounds from `cfg.synth`.
- `service_config`, `start_service`, `serve_forever`: the service's fixed config (cache, jobs
  root, token rule) and the process lifecycle of `dermaflux serve`.
"""

# No `from __future__ import annotations`: Serve reads `app`'s parameter annotation as a class to
# decide whether to validate `args` into it (a string annotation would pass the raw dict).

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from dermaflux.core.config import ConfigError
from dermaflux.synth.guard import auth_required, is_loopback, read_token
from dermaflux.synth.serve_api import SynthesisAPI
from dermaflux.synth.serve_model import SynthesisModel

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """`args` of the application builder (RayService `serveConfigV2`, `serve run ... key=value`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    preset: str | None = Field(None, description="a named preset (tiny, flux-dev)")
    config: str | None = Field(None, description="a YAML config file, applied over the preset")
    overrides: list[str] = Field(default_factory=list, alias="set",
                                 description="`key=value` overrides, as `--set` (one string or a list)")

    @field_validator("overrides", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value or []


def app(args: AppArgs):
    """The application builder a RayService's `serveConfigV2` (or `serve run`) imports:

        import_path: dermaflux.synth.serve_app:app
        args: {preset: flux-dev, config: /path/run.yaml, set: ["synth.adapters=[s3://...]"]}

    The cluster decides the bind address, so the token is required unless `synth.auth.required: false`.
    """
    return build_app(service_config(config_from_args(args), None))


def config_from_args(args: AppArgs):
    """The builder's args -> the config, with the model cache folder fixed once."""
    from dermaflux.config import load_config
    from dermaflux.model.config import cache_dir

    cfg = load_config(args.preset, args.config, list(args.overrides))
    cfg.model.cache_dir = str(cache_dir(cfg.model))
    return cfg


def build_app(cfg: "DermaFluxConfig"):
    """The Serve application for `cfg` (replicas, autoscaling and resources from `cfg.synth`)."""
    synth = cfg.synth
    scaling = synth.autoscaling
    options: dict = {
        "ray_actor_options": {"num_cpus": synth.cpus_per_replica, "num_gpus": synth.gpus_per_replica},
        "max_ongoing_requests": synth.max_ongoing_requests,
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }
    cfg_dict = cfg.model_dump(mode="json")
    model = SynthesisModel.options(**options).bind(cfg_dict)
    # Requests reach the ingress at once (Serve's default would queue all but 5 at the proxy, where
    # no limit sees them); the ingress refuses what it cannot hold, Serve what exceeds even that.
    # Serve holds twice the ingress' own limit of work requests (guard.RequestGuard counts them):
    # when slow bodies fill that limit, /healthz and /readyz still find room instead of a 429.
    limits = synth.limits
    ingress = {
        "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 2 * limits.max_open_requests,
        "max_queued_requests": limits.max_open_requests,
        "backpressure_config": {"status_code": 429, "retry_after_s": limits.retry_after_s},
    }
    return SynthesisAPI.options(**ingress).bind(model, cfg_dict)


def service_config(cfg: "DermaFluxConfig", bind_host: str | None):
    """A copy with the model resolved and the cache folder, jobs root and token rule fixed, so every
    replica on every node finds the same ones; a wrong adapter folder, model or a missing token
    fails here, with its name. `bind_host` None: the cluster binds (RayService), so a token is needed."""
    from dermaflux.model.config import cache_dir
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.synth.adapter_pool import adapter_folders

    cfg = cfg.model_copy(deep=True)
    cfg.model.cache_dir = str(cache_dir(cfg.model))
    synth = cfg.synth
    synth.jobs_root = str(Path(synth.jobs_root or Path(cfg.model.cache_dir) / "synth-jobs").expanduser().resolve())
    synth.auth.required = auth_required(synth.auth, bind_host)
    read_token(synth.auth, synth.auth.required)  # here, so a missing token stops the start with one line
    if not synth.auth.required and bind_host is not None and not is_loopback(bind_host):
        log.warning("synth.auth.required is false and the service binds to %s: anyone who reaches it may use it",
                    bind_host)
    folders = adapter_folders(synth.adapters)
    if synth.fuse_lora and len(folders) != 1:
        raise ConfigError(f"synth.fuse_lora: a service fuses exactly one adapter, synth.adapters names {len(folders)}")
    resolve_pretrained(cfg.model)
    return cfg


def start_service(cfg: "DermaFluxConfig", *, blocking: bool = False, access_log: bool = True):
    """Start (or update) the app on `cfg.synth.host:port`; returns the ingress handle."""
    from dermaflux.core.runtime import init_ray

    cfg = service_config(cfg, cfg.synth.host)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.synth.host, "port": cfg.synth.port})
    return serve.run(build_app(cfg), name=cfg.synth.app_name, route_prefix=cfg.synth.route_prefix, blocking=blocking,
                     logging_config={"enable_access_log": access_log})


def check_port_free(host: str, port: int) -> None:
    """ConfigError naming synth.port when `host:port` cannot be bound (as Serve's proxy would)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as err:
        raise ConfigError(f"synth.port: cannot listen on {host}:{port} ({err.strerror or err}); stop what holds it "
                          "or choose another --port") from None


def serve_forever(cfg: "DermaFluxConfig") -> dict:
    """The `serve` stage: run the service until Ctrl-C."""
    service_config(cfg, cfg.synth.host)  # token, model, adapters: refused before anything is announced
    check_port_free(cfg.synth.host, cfg.synth.port)
    print(f"serving on http://{cfg.synth.host}:{cfg.synth.port} (OpenAPI: /docs); Ctrl-C stops", flush=True)
    try:
        start_service(cfg, blocking=True)
    except KeyboardInterrupt:
        print("stopping the service", flush=True)
        serve.shutdown()
    return {"stopped": True}
