"""`dermaflux serve`: the synthesis HTTP service on Ray Serve (blocks until interrupted)."""

from __future__ import annotations

HELP = "serve the synthesis HTTP API on Ray Serve (loopback by default)"


def add_arguments(parser) -> None:
    parser.add_argument("--lora", action="append", default=None, metavar="DIR",
                        help="adapter folder, or NAME=DIR (repeatable; all are served at once)")
    parser.add_argument("--max-adapters", type=int, default=None, metavar="N",
                        help="adapters a replica keeps loaded, least recently used evicted (default 4)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=int, default=None, help="fixed number of synthesis replicas")


def config_overrides(args) -> dict:
    synth: dict = {"adapters": args.lora, "host": args.host, "port": args.port,
                   "max_adapters_per_replica": args.max_adapters}
    if args.replicas is not None:
        synth["autoscaling"] = {"min_replicas": args.replicas, "max_replicas": args.replicas}
    return {"synth": {k: v for k, v in synth.items() if v is not None}}


def run(args, cfg) -> int:
    from dermaflux.synth.serve_app import start_service

    from ray import serve

    print(f"serving on http://{cfg.synth.host}:{cfg.synth.port} (OpenAPI: /docs); Ctrl-C stops")
    try:
        start_service(cfg, blocking=True)
    except KeyboardInterrupt:
        print("stopping the service")
        serve.shutdown()
    return 0
