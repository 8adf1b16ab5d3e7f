"""The `ray` section and starting or joining Ray the same way for every stage.

With no address: inside a Ray job (RAY_ADDRESS set) join that cluster; otherwise start a new
local instance (never silently join a stray `ray start` cluster on the same machine).
"""

from __future__ import annotations

import os

from pydantic import Field

from dermaflux.core.config import ConfigModel


class RayConfig(ConfigModel):
    address: str | None = Field(
        None, description="cluster address; None uses RAY_ADDRESS when set (Ray jobs), else a new local instance"
    )
    num_cpus: int | None = Field(None, description="CPUs of the local instance (None: all)")
    num_gpus: int | None = None


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
