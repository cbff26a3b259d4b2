"""Training configuration as code: one dataclass, presets, and the checks that turn bad settings
into one clear error naming the setting, its value and what would be valid."""

from __future__ import annotations

import dataclasses
from typing import Any

from fdbp_jax.corrections import CORRECTIONS
from fdbp_jax.data import DATASETS
from fdbp_jax.models import MODELS, SPLIT_UNITS, model_blocks
from fdbp_jax.partition import MEASURES
from fdbp_jax.engines import ALGORITHMS, STASH_CHOICES

SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "bfloat16")
# settings that may change between a run and its resumption without changing its trajectory
RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "log_every", "keep_checkpoints", "tensorboard")


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A Config field: its default and its help, the one place the CLI reads them from (`cli` may name
    a `flag` other than --field-name)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass
class Config:
    """Every training setting, declared once: `fdbp-train` makes one flag per field (--field-name)."""

    model: str = setting("resnet20", "one of: " + ", ".join(MODELS))
    dataset: str = setting("cifar10", "one of: " + ", ".join(DATASETS))
    stages: int = setting(4, "K, pipeline stages")
    data_parallel: int = setting(2, "N, data-parallel replicas per stage (BP: every one of the K x N devices is one)")
    algorithm: str = setting("fdbp", "fdbp (fully decoupled), bp (synchronous data-parallel backprop), or the "
                                     "synchronous pipelines gpipe and 1f1b (exactly backprop, see --microbatches)")
    microbatches: int = setting(1, "gpipe / 1f1b: micro-batches per global batch, M (pipeline bubble (K-1)/(M+K-1))")
    shrink: float = setting(1.0, "gradient shrinking factor beta in (0, 1]")
    stash: str = setting("auto", "FDBP on a mesh: what each stage keeps of an in-flight forward: recompute "
                                 "(input and weights; the forward runs again), selective (conv and matmul "
                                 "outputs) or residuals (all; the most memory); auto: the fastest of selective "
                                 "and recompute that fits in device memory; docs/performance.md")
    epochs: int = setting(5, "passes over the training set")
    batch_size: int = setting(128, "global batch per tick")
    lr: float = setting(0.1, "peak learning rate")
    momentum: float = setting(0.9, "SGD momentum in [0, 1)")
    weight_decay: float = setting(5e-4, "coupled (PyTorch-style) weight decay")
    schedule: str = setting("cosine", "constant | step | cosine (after the linear warm-up)")
    step_epochs: tuple = setting((), "--schedule step: epochs where lr is divided by 10 (default: 50%, 75%), e.g. 150,225,275")
    warmup_epochs: float = setting(0.0, "linear learning-rate warm-up, in epochs")
    seed: int = setting(0, "initialisation, data order and augmentation")
    train_examples: int | None = setting(None, "use the first N training examples (default: all)")
    eval_examples: int | None = setting(None, "use the first N test examples (default: all)")
    boundaries: tuple | None = setting(None, "block indices where stages 1..K-1 start, e.g. 10,19,28 (default: cost-balanced)")
    split_by: str = setting("flops", "what the cost-balanced split balances: flops (counted, the same everywhere) or "
                                     "time (each block measured on this device: what balances real workers)")
    split_unit: str = setting("block", "what stage boundaries fall between: block (whole residual blocks) or half-block "
                                       "(each ResNet basic block cut between its convs, the shortcut travelling with "
                                       "the activation: finer cuts that balance small K)")
    eval_batch_size: int = setting(1000, "examples per evaluation batch")
    log_every: int = setting(20, "ticks between train events in metrics.jsonl and TensorBoard")
    keep_checkpoints: int = setting(3, "how many recent checkpoints to keep")
    skip_nonfinite: bool = setting(False, "skip (and count) updates whose gradient has NaN/inf instead of stopping with exit code 3")
    emulate: bool = setting(False, "run on one device, simulating the replicas the mesh run would have (see `replicas`)")
    staleness_power: float = setting(1.0, "FDBP: scale stage k's updates by (1 + delay_k)^-power (0: plain FDBP; docs/staleness.md)")
    staleness_warmup: int = setting(0, "FDBP: ramp stage k's updates up over this many updates per tick of delay")
    correction: str = setting("none", "FDBP staleness correction: none, predict (forwards on the weights extrapolated "
                                      "over the stage's delay) or lookahead (the momentum as a delay-aware Nesterov "
                                      "look-ahead); docs/staleness.md")
    tensorboard: bool = setting(True, "TensorBoard event files in <workdir>/tensorboard, next to metrics.jsonl",
                                flag="--no-tensorboard")
    dtype: str = setting("float32", "compute dtype: float32 or bfloat16 (parameters and optimizer state stay float32)")

    @property
    def replicas(self) -> int:
        """Data-parallel replicas of the run: FDBP and the pipelines keep N per stage on their K x N
        devices; BP makes every one of those K x N devices a replica of the whole model. --emulate
        simulates the same."""
        pipelined = self.algorithm not in ALGORITHMS or ALGORITHMS[self.algorithm].pipelined
        return self.data_parallel * (1 if pipelined else self.stages)

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
    choices = (("model", MODELS), ("dataset", DATASETS), ("algorithm", ALGORITHMS), ("schedule", SCHEDULES),
               ("dtype", DTYPES), ("stash", STASH_CHOICES), ("split_by", MEASURES),
               ("split_unit", SPLIT_UNITS),
               ("correction", CORRECTIONS))
    for name, valid in choices:
        if getattr(c, name) not in valid:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)}: unknown; valid: {', '.join(valid)}")
    try:
        num_blocks = len(model_blocks(c.model, split_unit=c.split_unit))
    except ValueError as error:
        raise ValueError(f"--split-unit {c.split_unit} with --model {c.model}: {error}") from None
    if not 1 <= c.stages <= num_blocks:
        raise ValueError(f"--stages {c.stages}: must be between 1 and {num_blocks} (the blocks of {c.model})")
    if c.data_parallel < 1:
        raise ValueError(f"--data-parallel {c.data_parallel}: must be >= 1")
    if c.batch_size < c.replicas or c.batch_size % c.replicas:
        devices = (f"the {c.replicas} replicas of BP (--stages {c.stages} x --data-parallel {c.data_parallel} devices)"
                   if c.algorithm == "bp" else f"--data-parallel {c.data_parallel}")
        raise ValueError(f"--batch-size {c.batch_size}: must be a positive multiple of {devices}")
    if c.correction != "none" and c.algorithm != "fdbp":
        raise ValueError(f"--correction {c.correction}: corrects FDBP's stale gradients, not --algorithm "
                         f"{c.algorithm}; use --correction none")
    if c.microbatches < 1:
        raise ValueError(f"--microbatches {c.microbatches}: must be >= 1")
    if c.microbatches > 1 and not ALGORITHMS[c.algorithm].microbatched:
        raise ValueError(f"--microbatches {c.microbatches}: only the synchronous pipelines (--algorithm gpipe or "
                         f"1f1b) split a batch into micro-batches, not --algorithm {c.algorithm}")
    if c.batch_size % (c.replicas * c.microbatches):
        raise ValueError(f"--batch-size {c.batch_size}: must be a multiple of --data-parallel {c.data_parallel} x "
                         f"--microbatches {c.microbatches} = {c.replicas * c.microbatches}")
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
