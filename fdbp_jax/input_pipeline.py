"""The input pipeline, on grain: a random-access source of (image, label) records (`data.ArrayDataset`,
read from `tfds.data_source` or the JPEG tarball), shuffled per epoch from the seed, augmented per
record (random 4-pixel-padded crop, horizontal flip: grain's `random_map`, whose generator depends
only on the seed and the record's place in the epoch), normalised, and cut into the tick's global
batches. Each process reads only its rows of each global batch (`Trainer.local_rows`), so the
global batch is the same whatever the number of processes. Worker threads prefetch; the iterator's
state goes into the checkpoint, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import numpy as np

from fdbp_jax.data import DatasetSpec

PAD = 4  # pixels of zero padding around an image before its random crop
PREFETCH = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """An integer seed for one random stream (0: order, 1: augmentation) of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def augment(record: tuple, rng: np.random.Generator) -> tuple:
    """Random crop of the zero-padded image and random horizontal flip."""
    image, label = record
    height, width, _ = image.shape
    dy, dx = rng.integers(0, 2 * PAD + 1, size=2)
    crop = np.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)))[dy : dy + height, dx : dx + width]
    return (crop[:, ::-1] if rng.random() < 0.5 else crop), label


def normalize(images: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """uint8 (..., C) -> float32, per-channel standardised with the dataset's statistics."""
    return (images.astype(np.float32) / 255.0 - spec.mean) / spec.std


def ticks_per_epoch(size: int, batch_size: int) -> int:
    """Full global batches in one epoch (the remainder of the shuffled order is skipped)."""
    return size // batch_size


def _rows_of_batches(dataset: grain.MapDataset, batches: int, batch_size: int, rows: range) -> grain.MapDataset:
    """Element t: rows `rows` of global batch t of `dataset` (only those records are read)."""
    positions = [t * batch_size + r for t in range(batches) for r in rows]
    return grain.MapDataset.source(positions).map(lambda position: dataset[position]).batch(len(rows))


def train_dataset(
    source: Sequence, spec: DatasetSpec, seed: int, epoch: int, batch_size: int, rows: range | None = None
) -> grain.MapDataset:
    """One epoch of training batches: element t is (images float32 (len(rows), H, W, C), labels) of
    global batch t, `rows` of it (default: all)."""
    records = grain.MapDataset.source(source).shuffle(seed=stream_seed(seed, epoch, 0))
    augmented = records.random_map(augment, seed=stream_seed(seed, epoch, 1))
    batches = _rows_of_batches(augmented, ticks_per_epoch(len(source), batch_size), batch_size,
                               rows if rows is not None else range(batch_size))
    return batches.map(lambda batch: (normalize(batch[0], spec), batch[1]))


def eval_dataset(source: Sequence, spec: DatasetSpec, batch_size: int, rows: range | None = None) -> grain.MapDataset:
    """The split in order, in global batches of `batch_size` (the last one padded): element t is
    (images, labels, valid) of `rows` of batch t; padding rows have valid False."""
    count, batches = len(source), -(-len(source) // batch_size)
    image_shape = np.asarray(source[0][0]).shape

    def record(position: int) -> tuple:
        if position < count:
            image, label = source[position]
            return image, label, True
        return np.zeros(image_shape, np.uint8), 0, False

    padded = grain.MapDataset.range(batches * batch_size).map(record)
    batched = _rows_of_batches(padded, batches, batch_size, rows if rows is not None else range(batch_size))
    return batched.map(lambda batch: (normalize(batch[0], spec), batch[1], batch[2]))


def iterate(dataset: grain.MapDataset, state: dict | None = None) -> Iterator:
    """A prefetching iterator over `dataset` (worker threads); `state`: a state from its `get_state()`
    (kept in checkpoints) to continue exactly where that iterator was."""
    iterator = iter(dataset.to_iter_dataset(PREFETCH))
    if state is not None:
        iterator.set_state(state)
    return iterator
