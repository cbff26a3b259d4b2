"""Training configuration as code: one dataclass, presets, and the checks that turn bad settings
into one clear error naming the setting, its value and what would be valid."""

from __future__ import annotations

import dataclasses
from typing import Any

from fdbp_jax.data import DATASETS
from fdbp_jax.models import MODELS, model_blocks
from fdbp_jax.trainer import ALGORITHMS

SCHEDULES = ("constant", "step", "cosine")
# settings that may change between a run and its resumption without changing its trajectory
RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "log_every", "keep_checkpoints", "tensorboard")


@dataclasses.dataclass
class Config:
    model: str = "resnet20"
    dataset: str = "cifar10"
    stages: int = 4
    data_parallel: int = 2
    algorithm: str = "fdbp"
    shrink: float = 1.0
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: tuple = ()  # epochs where the step schedule divides lr by 10 (default: 50%, 75%)
    warmup_epochs: float = 0.0
    seed: int = 0
    train_examples: int | None = None
    eval_examples: int | None = None
    boundaries: tuple | None = None  # block indices where stages 1..K-1 start; None: cost-balanced
    eval_batch_size: int = 1000
    log_every: int = 20
    keep_checkpoints: int = 3
    skip_nonfinite: bool = False  # skip (and count) updates with NaN/inf gradients instead of stopping
    emulate: bool = False  # run on one device: the FDBP emulator / BP, simulating the replicas of `replicas`
    staleness_power: float = 1.0  # FDBP: stage k's updates scaled by (1 + delay_k)^-power (0: off; docs/staleness.md)
    staleness_warmup: int = 0  # FDBP: stage k's updates ramped up over staleness_warmup * delay_k updates
    tensorboard: bool = True  # TensorBoard event files in <workdir>/tensorboard, next to metrics.jsonl

    @property
    def replicas(self) -> int:
        """Data-parallel replicas of the run: FDBP keeps N per stage on its K x N devices; BP makes
        every one of those K x N devices a replica of the whole model. --emulate simulates the same."""
        return self.data_parallel * (self.stages if self.algorithm == "bp" else 1)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "Config":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-friendly: small CNN on a CIFAR-10 subset, K=4 stages x N=2 replicas, a few epochs
    "quick": dict(
        model="cnn", stages=4, data_parallel=2, epochs=6, batch_size=128, lr=0.05, momentum=0.9,
        weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0, train_examples=10000, eval_examples=2000,
    ),
    # FDG's CIFAR setup: ResNet-56, K=4, N=2, batch 128, SGD 0.1/0.9, wd 5e-4, 300 epochs, /10 at 150/225/275
    # (plus the default staleness control; --staleness-power 0 for FDG's plain FDBP)
    "paper": dict(
        model="resnet56", stages=4, data_parallel=2, epochs=300, batch_size=128, lr=0.1, momentum=0.9,
        weight_decay=5e-4, schedule="step", step_epochs=(150, 225, 275), warmup_epochs=0.0,
        train_examples=None, eval_examples=None,
    ),
}


def validate(config: Config) -> None:
    """Raise ValueError naming the first bad setting (flag spelling, value, what is valid)."""
    c = config
    choices = (("model", MODELS), ("dataset", DATASETS), ("algorithm", ALGORITHMS), ("schedule", SCHEDULES))
    for name, valid in choices:
        if getattr(c, name) not in valid:
            raise ValueError(f"--{name} {getattr(c, name)}: unknown; valid: {', '.join(valid)}")
    num_blocks = len(model_blocks(c.model))
    if not 1 <= c.stages <= num_blocks:
        raise ValueError(f"--stages {c.stages}: must be between 1 and {num_blocks} (the blocks of {c.model})")
    if c.data_parallel < 1:
        raise ValueError(f"--data-parallel {c.data_parallel}: must be >= 1")
    if c.batch_size < c.replicas or c.batch_size % c.replicas:
        devices = (f"the {c.replicas} replicas of BP (--stages {c.stages} x --data-parallel {c.data_parallel} devices)"
                   if c.algorithm == "bp" else f"--data-parallel {c.data_parallel}")
        raise ValueError(f"--batch-size {c.batch_size}: must be a positive multiple of {devices}")
    if not 0.0 < c.shrink <= 1.0:
        raise ValueError(f"--shrink {c.shrink}: must be in (0, 1]")
    if c.lr <= 0:
        raise ValueError(f"--lr {c.lr}: must be > 0")
    for name in ("epochs", "momentum", "weight_decay", "warmup_epochs", "seed"):
        if getattr(c, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be >= 0")
    if c.momentum >= 1:
        raise ValueError(f"--momentum {c.momentum}: must be in [0, 1)")
    if c.warmup_epochs > c.epochs:
        raise ValueError(f"--warmup-epochs {c.warmup_epochs}: longer than --epochs {c.epochs}")
    for name in ("eval_batch_size", "log_every", "keep_checkpoints"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be >= 1")
    if c.schedule == "step" and any(not 0 < e <= c.epochs for e in c.step_epochs):
        raise ValueError(f"--step-epochs {','.join(map(str, c.step_epochs))}: each must be between 1 and "
                         f"--epochs {c.epochs}")
    for name in ("train_examples", "eval_examples"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be >= 1 (or omitted for the whole split)")
    if c.train_examples is not None and c.train_examples < c.batch_size:
        raise ValueError(f"--train-examples {c.train_examples}: fewer than one --batch-size {c.batch_size}")
    if c.staleness_power < 0 or c.staleness_warmup < 0:
        raise ValueError(
            f"--staleness-power {c.staleness_power} / --staleness-warmup {c.staleness_warmup}: must be >= 0"
        )
    if c.boundaries is not None:
        from fdbp_jax.partition import check_boundaries

        check_boundaries(c.boundaries, num_blocks, c.stages)
