"""Cross-cutting core: configuration machinery, artifacts, Ray runtime, storage, preflight, the entry path."""
