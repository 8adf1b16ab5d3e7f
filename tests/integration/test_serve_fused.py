"""`serve --fuse-lora`: one LoRA merged into the base of every replica; the service samples only that adapter."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from dermaflux.testing.serve import tiny_service

pytestmark = pytest.mark.integration


def test_a_fused_service_samples_its_adapter_and_refuses_the_base(ray_local, tiny_config, dermaflux_cache, tmp_path):
    from PIL import Image

    from dermaflux.config import load_config
    from dermaflux.synth.adapter_pool import AdapterPool
    from dermaflux.synth.requests import SampleRequest, Settings
    from dermaflux.synth.sampling import generate_images

    with tiny_service(tiny_config.model, dermaflux_cache, tmp_path, ["lora_a"], fuse_lora=True,
                      num_inference_steps=4) as service:
        refused = service.client.post("/v1/images", json={"prompt": "a nevus", "seed": 3})
        answer = service.client.post("/v1/images", json={"prompt": "a nevus", "seed": 3, "adapter": "lora_a"})
    [detail] = refused.json()["detail"]
    assert refused.status_code == 422 and detail["loc"] == ["adapter"], refused.text
    assert "only adapter 'lora_a', fused into the base" in detail["msg"]
    assert answer.status_code == 200, answer.text
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]["png_base64"]))))

    # The same request on an unfused pool in this process: equal within rounding (W + BA vs Wx + B(Ax)).
    cfg = load_config("tiny", extra={"synth": {"adapters": [str(tmp_path / "lora_a")]}})
    settings = Settings(64, 64, 4, cfg.model.guidance_scale, "lora_a")
    [image] = generate_images(AdapterPool.from_config(cfg), [SampleRequest("a nevus", 3, settings)],
                              max_sequence_length=cfg.model.max_sequence_length)
    assert np.abs(np.asarray(image).astype(np.int16) - served.astype(np.int16)).max() <= 2


def test_a_service_fuses_exactly_one_adapter(tiny_config, dermaflux_cache, tmp_path):
    from dermaflux.config import load_config
    from dermaflux.core.config import ConfigError
    from dermaflux.synth.serve_app import service_config
    from dermaflux.testing.adapters import random_lora_adapter

    folders = [str(random_lora_adapter(tiny_config.model, tmp_path / name, seed=i)) for i, name in enumerate("ab")]
    cfg = load_config("tiny", extra={"model": {"cache_dir": str(dermaflux_cache)},
                                     "synth": {"adapters": folders, "fuse_lora": True}})
    with pytest.raises(ConfigError, match="fuses exactly one adapter, synth.adapters names 2"):
        service_config(cfg, "127.0.0.1")
    cfg.synth.adapters = folders[:1]
    assert service_config(cfg, "127.0.0.1").synth.fuse_lora
