"""A Ray Serve application builder for config files: what a RayService's `serveConfigV2` imports.

    import_path: dermaflux.serve_builder:app
    args: {preset: flux-dev, config: /path/run.yaml, set: ["synth.adapters=[s3://...]"]}

`serve run dermaflux.serve_builder:app preset=tiny` works the same way. The app itself is the
synth stage's (`dermaflux.synth.serve_app.build_app`); this only turns Serve's `args` into a config.
"""

from __future__ import annotations


def config_from_args(args: dict):
    from dermaflux.config import cache_dir, load_config

    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(args.get("preset"), args.get("config"), list(overrides))
    # Fix the model cache folder here, once, so every replica on every node finds the same one.
    cfg.model.cache_dir = str(cache_dir(cfg.model))
    return cfg


def app(args: dict):
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.synth.adapters import adapter_folders
    from dermaflux.synth.serve_app import build_app

    cfg = config_from_args(args)
    adapter_folders(cfg.synth.adapters)  # a wrong adapter folder fails the deploy, with its name
    resolve_pretrained(cfg.model)
    return build_app(cfg)
