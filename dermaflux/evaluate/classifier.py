"""Training a timm classifier on uint8 image arrays: augmentations, balancing, early stopping.

Pure torch (no Ray): one call trains one grid cell's model. Pretrained weights are used only
when timm's file is already in the local Hugging Face cache; nothing is ever downloaded.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.metrics import classification_metrics

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainSettings:
    model: str
    epochs: int
    patience: int
    image_size: int
    batch_size: int
    lr: float
    weight_decay: float
    balancing: str  # none | sampler | loss
    pretrained: bool
    threads: int = 1
    steps: int = 0  # optimiser steps; 0: `epochs` epochs with early stopping
    validations: int = 4  # steps mode: evenly spaced val checks

    @classmethod
    def from_config(cls, cfg: EvaluateConfig, model: str) -> TrainSettings:
        return cls(
            model=model, epochs=cfg.epochs, patience=cfg.patience, image_size=cfg.image_size,
            batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, balancing=cfg.balancing,
            pretrained=cfg.pretrained, threads=max(1, int(cfg.cpus_per_cell)), steps=cfg.steps,
            validations=cfg.validations,
        )


def local_pretrained_file(name: str) -> str | None:
    """The cached weight file of timm model `name`, or None (never touches the network)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown tag or no pretrained cfg
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def create_classifier(name: str, num_classes: int, image_size: int, pretrained: bool) -> tuple[torch.nn.Module, bool]:
    """A timm model by name; returns (model, used_pretrained_weights)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"evaluate.models: {name!r} is not a timm model name (see timm.list_models())")
    weights = local_pretrained_file(name) if pretrained else None
    kwargs: dict = {"num_classes": num_classes}
    if weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
    try:
        # Transformers fix their position embeddings to an input size; CNNs take no img_size argument.
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:
        model = timm.create_model(name, **kwargs)
    return model, bool(weights)


class ImageArrayDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        # A copy: arrays from the Ray object store are read-only.
        self.images = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2)  # N,3,H,W uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def train_transform(size: int):
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),  # dermoscopy has no preferred orientation
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = v2.functional.resize(x, [size, size], antialias=True)
    x = x.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, size: int, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        out.append(F.softmax(model(eval_tensor(images[start : start + batch_size], size)), dim=1))
    return torch.cat(out).numpy()


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: np.ndarray, size: int, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features (timm's pre-logits), the feature space of FID/KID and the memorisation check."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_tensor(images[start : start + batch_size], size)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).flatten(1))
    return torch.cat(out).numpy().astype(np.float64)


def recalibrate_batchnorm(model: torch.nn.Module, images: np.ndarray, size: int, max_images: int = 1024,
                          batch_size: int = 128, seed: int = 0) -> None:
    """Re-estimate BatchNorm running statistics on (un-augmented) train images for the current weights.

    With few optimiser steps (short CPU runs) the momentum-averaged running stats lag far behind the
    weights, and eval-mode predictions collapse onto one class although the ranking (AUROC) is fine;
    this is SWA's `update_bn` over a fixed subset."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    rng = np.random.default_rng(seed)
    subset = images[np.sort(rng.choice(len(images), size=min(max_images, len(images)), replace=False))]
    batches = [eval_tensor(subset[i : i + batch_size], size) for i in range(0, len(subset), batch_size)]
    torch.optim.swa_utils.update_bn(batches, model)


def _class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    return weights


def _loader(dataset: Dataset, train_y: np.ndarray, class_w: np.ndarray, settings: TrainSettings,
            generator: torch.Generator) -> DataLoader:
    drop_last = len(train_y) > settings.batch_size
    if settings.balancing == "sampler":
        sampler = WeightedRandomSampler(class_w[train_y], num_samples=len(train_y), replacement=True,
                                        generator=generator)
        return DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=drop_last)
    return DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator, drop_last=drop_last)


def _endless(loader: DataLoader):
    """Batches across passes (each pass reshuffled): a step budget does not care where epochs end."""
    while True:
        yield from loader


def validation_steps(steps: int, validations: int) -> list[int]:
    """The optimiser steps after which a steps-mode run is validated: evenly spaced, the last one at `steps`."""
    checks = min(validations, steps)
    return sorted({max(1, round(steps * (i + 1) / checks)) for i in range(checks)})


@dataclass
class _Selection:
    """The best validated state so far (by val AUROC, the primary metric; balanced accuracy breaks ties)."""

    score: float = -float("inf")
    state: dict | None = None
    at: int = -1

    def offer(self, model: torch.nn.Module, val: dict, at: int) -> bool:
        auroc = val["macro_auroc"]
        score = (0.0 if np.isnan(auroc) else auroc) + 1e-3 * val["balanced_accuracy"]
        if score > self.score:
            self.score, self.state, self.at = score, copy.deepcopy(model.state_dict()), at
            return True
        return False


def _validate(model, train_x, val_x, val_y, classes, settings: TrainSettings, seed: int) -> dict:
    recalibrate_batchnorm(model, train_x, settings.image_size, seed=seed)
    return classification_metrics(val_y, predict_proba(model, val_x, settings.image_size), classes)


def train_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    classes: tuple[str, ...],
    settings: TrainSettings,
    seed: int,
) -> tuple[torch.nn.Module, dict]:
    """Train with AdamW + cosine decay for `settings.steps` optimiser steps (or `settings.epochs`
    epochs with early stopping when steps is 0); keep the validated state with the best val AUROC."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(settings.threads)
    model, used_pretrained = create_classifier(settings.model, len(classes), settings.image_size, settings.pretrained)
    class_w = _class_weights(train_y, len(classes))
    dataset = ImageArrayDataset(train_x, train_y, train_transform(settings.image_size))
    loader = _loader(dataset, train_y, class_w, settings, torch.Generator().manual_seed(seed))
    loss_weight = torch.tensor(class_w, dtype=torch.float32) if settings.balancing == "loss" else None
    total_steps = settings.steps or settings.epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))

    def step(x, y) -> float:
        loss = F.cross_entropy(model(x), y, weight=loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    def validate(at: int, train_loss: float) -> tuple[dict, bool]:
        val = _validate(model, train_x, val_x, val_y, classes, settings, seed)
        record = {"step": at, "train_loss": train_loss, "val_balanced_accuracy": val["balanced_accuracy"],
                  "val_macro_auroc": val["macro_auroc"]}
        log.debug("step %d train loss %.4f val auroc %.4f", at, train_loss, val["macro_auroc"])
        improved = selection.offer(model, val, at)
        model.train()  # validation switched it to eval mode
        return record, improved

    selection = _Selection()
    model.train()
    start = time.perf_counter()
    run = _run_steps if settings.steps else _run_epochs
    history, steps_done = run(loader, settings, step, validate)
    model.load_state_dict(selection.state)
    return model, {
        "optimizer_steps": steps_done, "best_step": selection.at, "validations": len(history), "history": history,
        "pretrained": used_pretrained, "train_seconds": time.perf_counter() - start,
        "mode": "steps" if settings.steps else "epochs", "train_images": int(len(train_y)),
    }


def _run_steps(loader: DataLoader, settings: TrainSettings, step, validate) -> tuple[list[dict], int]:
    """Exactly `settings.steps` optimiser steps, validated at `validation_steps`."""
    checks = set(validation_steps(settings.steps, settings.validations))
    batches = _endless(loader)
    history, losses = [], []
    for at in range(1, settings.steps + 1):
        x, y = next(batches)
        losses.append(step(x, y))
        if at in checks:
            record, _ = validate(at, float(np.mean(losses)))
            history.append(record)
            losses = []
    return history, settings.steps


def _run_epochs(loader: DataLoader, settings: TrainSettings, step, validate) -> tuple[list[dict], int]:
    """Up to `settings.epochs` passes, validated after each; stops after `patience` passes without a gain."""
    history, stale, steps_done = [], 0, 0
    for epoch in range(settings.epochs):
        losses = [step(x, y) for x, y in loader]
        steps_done += len(losses)
        record, improved = validate(steps_done, float(np.mean(losses)) if losses else float("nan"))
        history.append({**record, "epoch": epoch})
        stale = 0 if improved else stale + 1
        if stale >= settings.patience:
            break
    return history, steps_done
