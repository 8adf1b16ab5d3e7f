"""Start or join Ray the same way in every stage.

With no address: inside a Ray job (RAY_ADDRESS set) join that cluster; otherwise start a new
local instance (never silently join a stray `ray start` cluster on the same machine).
"""

from __future__ import annotations

import os

from dermaflux.config import RayConfig


def init_ray(ray_cfg: RayConfig | None = None, **kwargs):
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    ray_cfg = ray_cfg or RayConfig()
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    options: dict = {"address": address, "log_to_driver": True, **kwargs}
    if address == "local":
        options.setdefault("include_dashboard", False)
        if ray_cfg.num_cpus is not None:
            options["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.num_gpus is not None:
            options["num_gpus"] = ray_cfg.num_gpus
    ray.init(**options)
    return ray.get_runtime_context()
