"""The trainer's strategy seam: `train.strategy` validates, DeepSpeed stays inside its strategy module, a checkpoint
folder names the strategy that wrote it, and FSDP2's save/load/gather round-trip on one gloo rank."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dermaflux.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
# The only files that may spell DeepSpeed: its strategy and the config dict it passes to deepspeed.initialize.
DEEPSPEED_FILES = {"dermaflux/train/strategy/deepspeed.py", "dermaflux/train/ds_config.py"}


def test_strategy_setting_validates():
    assert load_config("tiny").train.strategy == "deepspeed"
    assert load_config("tiny", overrides=["train.strategy=fsdp2"]).train.strategy == "fsdp2"
    with pytest.raises(ConfigError, match="train.strategy"):
        load_config("tiny", overrides=["train.strategy=ddp"])
    with pytest.raises(ConfigError, match="offload_optimizer and offload_params are DeepSpeed options"):
        load_config("tiny", overrides=["train.strategy=fsdp2", "train.offload_optimizer=true"])


def test_deepspeed_lives_only_in_its_strategy():
    found = []
    for path in sorted((ROOT / "dermaflux").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in DEEPSPEED_FILES:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "deepspeed" for n in names):
                found.append(f"{rel}:{node.lineno} imports deepspeed")
            if isinstance(node, ast.Attribute) and node.attr in ("ds_tensor", "save_checkpoint", "load_checkpoint"):
                found.append(f"{rel}:{node.lineno} uses .{node.attr}")
    assert not found, found


_IMPORTS = """
import json, sys
import dermaflux.train.strategy, dermaflux.train.strategy.fsdp2, dermaflux.train.checkpointing
import dermaflux.train.validation, dermaflux.train.ray_trainer
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"ray", "deepspeed"})))
"""


def test_choosing_fsdp2_imports_neither_ray_nor_deepspeed():
    proc = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_a_checkpoint_written_under_another_strategy_is_refused_by_name(tmp_path, tiny_config):
    from dermaflux.train.checkpointing import Checkpointer
    from dermaflux.train.ray_trainer import latest_checkpoint
    from dermaflux.train.strategy import strategy_class

    ckpt = tmp_path / "ray" / "train" / "step-000004"
    (ckpt / "adapter").mkdir(parents=True)
    assert latest_checkpoint(tmp_path / "ray") is None  # an adapter without any strategy's state is not complete
    (ckpt / "fsdp2").mkdir()
    assert latest_checkpoint(tmp_path / "ray") == ckpt
    tc = tiny_config.train
    strategy = strategy_class("deepspeed")(tc, torch.device("cpu"), torch.float32, 1)
    checkpointer = Checkpointer(strategy, tc, tiny_config.model, "unused", rank=0)
    with pytest.raises(ValueError, match=r"no deepspeed/ state .* holds \['fsdp2'\]"):
        checkpointer.restore(ckpt, "step-000004")


# One gloo rank in a fresh process (torch.distributed state must not leak into the test process): train a LoRA
# step, save, train on, load, and compare with what was saved; gather's keys are the unwrapped model's.
_FSDP2_ROUND_TRIP = """
import json, os, sys, tempfile
from pathlib import Path
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
from diffusers import FluxTransformer2DModel
from dermaflux.config import load_config
from dermaflux.train.model_setup import prepare_transformer, trainable_state_dict, state_checksum
from dermaflux.train.strategy import strategy_class
cfg = load_config("tiny", extra={"train": {"strategy": "fsdp2", "mode": "lora", "grad_accum": 2,
                                           "lora": {"rank": 4}, "warmup_steps": 0,
                                           "lr_scheduler": "linear", "steps": 10}})
def build():
    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_pretrained(sys.argv[1], subfolder="transformer")
    prepare_transformer(model, cfg.train)
    return model
plain_keys = sorted(trainable_state_dict(build(), cfg.train))
strategy = strategy_class("fsdp2")(cfg.train, torch.device("cpu"), torch.float32, 1)
strategy.wrap(build())
def train_step():
    for _ in range(2):  # grad_accum micro-batches, one optimizer step
        loss = sum((p * p).sum() for p in strategy.params if p.requires_grad).full_tensor()
        strategy.backward(loss)
        strategy.step()
train_step()
saved = strategy.gather_trainable()
folder = Path(tempfile.mkdtemp()) / "fsdp2"
strategy.save(folder, {"step": 1, "history": [{"step": 1}], "weights_checksum": state_checksum(saved)})
lr_saved = strategy.scheduler.get_last_lr()[0]
train_step()
lr_later = strategy.scheduler.get_last_lr()[0]
moved = state_checksum(strategy.gather_trainable())
client = strategy.load(folder)
restored = strategy.gather_trainable()
print(json.dumps({"keys_match": sorted(saved) == plain_keys, "n": len(saved),
                  "moved": moved != client["weights_checksum"],
                  "restored": all(torch.equal(saved[k], restored[k]) for k in saved), "client": client,
                  "lr": [lr_saved, lr_later, strategy.scheduler.get_last_lr()[0]],
                  "state_mb": strategy.rank_state_mb()}))
dist.destroy_process_group()
"""


def test_fsdp2_saves_loads_and_gathers_on_one_gloo_rank(tiny_model_dir):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = subprocess.run([sys.executable, "-c", _FSDP2_ROUND_TRIP, str(tiny_model_dir), port],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["keys_match"] and out["n"] > 0  # peft naming, as save_adapter and the DeepSpeed path write it
    assert out["moved"] and out["restored"]  # a later step changed the LoRA; loading brought back the saved one
    assert (out["client"]["step"], out["client"]["history"]) == (1, [{"step": 1}])
    lr_saved, lr_later, lr_restored = out["lr"]
    assert lr_later < lr_saved == lr_restored  # the linear schedule's position came back with it
    assert out["state_mb"] > 0
