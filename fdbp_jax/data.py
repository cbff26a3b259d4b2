"""CIFAR-10 through `tfds.data_source`: decoded once into memory, shuffled per epoch from a seed,
augmented with vectorised numpy (random 4-pixel-padded crop, horizontal flip) and normalised."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
DATASETS = ("cifar10",)


class DatasetUnavailable(RuntimeError):
    """The dataset is neither prepared locally nor downloadable."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Images (n, H, W, C) uint8 and integer labels (n,), all in host memory."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_tfds(
    name: str, split: str, examples: int | None = None, data_dir: str | None = None, download: bool = True
) -> ArrayDataset:
    """Read `split` of a TFDS image dataset into memory (first `examples` only, if given).

    Honours TFDS_DATA_DIR (or `data_dir`); downloads and prepares it where the internet is reachable.
    """
    import tensorflow_datasets as tfds

    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is not supported: use one of {DATASETS}")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None  # read now: tfds reads it once, at import
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            if not download:
                raise FileNotFoundError("download=False")
            builder.download_and_prepare(file_format="array_record")
        except Exception as err:
            if isinstance(err, ModuleNotFoundError):  # TFDS's prepare path needs more than reading does
                raise DatasetUnavailable(
                    f"preparing {name!r} with tensorflow-datasets needs the module {err.name!r}: install the "
                    f"project's prepare extra (pip install -e '.[prepare]', or bash .ci/setup) and run again"
                ) from None
            where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets (TFDS_DATA_DIR is unset)"
            raise DatasetUnavailable(
                f"dataset {name!r} is not prepared under {where} and could not be downloaded "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); set TFDS_DATA_DIR to a "
                f"folder holding {name}/ prepared by tensorflow-datasets, or run where the download is reachable"
            ) from None
    source = builder.as_data_source(split=split)
    count = len(source) if examples is None else min(examples, len(source))
    records = _read(source, count)
    return ArrayDataset(
        images=np.stack([r["image"] for r in records]).astype(np.uint8),
        labels=np.asarray([r["label"] for r in records], np.int32),
    )


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_jpeg_tarball(path: str, split: str, examples: int | None = None) -> ArrayDataset:
    """CIFAR-10 from a tar.gz of `<split>/<class>/NNNN.jpg` files (the copy that travels to machines
    without TFDS data), decoded with pillow, sorted by class then file name (`examples`: a fixed
    random subset, kept in that order)."""
    import io
    import tarfile

    from PIL import Image

    files = {}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:  # one sequential pass: random access into a .gz re-decompresses
            name = member.name.lstrip("./")
            if member.isfile() and name.startswith(f"{split}/") and name.endswith(".jpg"):
                files[name] = archive.extractfile(member).read()
    if not files:
        raise DatasetUnavailable(f"{path} holds no {split}/<class>/*.jpg files")
    names = sorted(files)
    if examples is not None:
        names = [names[i] for i in sorted(np.random.default_rng(0).permutation(len(names))[:examples])]
    images, labels = [], []
    for name in names:
        labels.append(CIFAR10_CLASSES.index(name.split("/")[1]))
        with Image.open(io.BytesIO(files[name])) as image:
            images.append(np.asarray(image.convert("RGB"), np.uint8))
    return ArrayDataset(np.stack(images), np.asarray(labels, np.int32))


def _read(source, count: int) -> list:
    """The first `count` records; batched where the source supports it (tfds.testing.mock_data's
    sources only read one record at a time)."""
    try:
        return source.__getitems__(list(range(count)))
    except TypeError:
        return [source[i] for i in range(count)]


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def ticks_per_epoch(size: int, batch_size: int) -> int:
    """Full global batches in one epoch (the remainder of the shuffled order is skipped)."""
    return size // batch_size


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32, per-channel standardised."""
    return (images.astype(np.float32) / 255.0 - CIFAR10_MEAN) / CIFAR10_STD


def augment(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Random crop of the zero-padded image and random horizontal flip, for a whole batch at once."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
    dy, dx = rng.integers(0, 2 * padding + 1, size=(2, n))
    crops = windows[np.arange(n), dy, dx].transpose(0, 2, 3, 1)  # (n, C, H, W) -> (n, H, W, C)
    flip = rng.random(n) < 0.5
    return np.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def train_batch(
    data: ArrayDataset, order: np.ndarray, seed: int, epoch: int, index: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global batch `index` of an epoch whose example order is `order`: augmented and normalised.
    Deterministic in its arguments, so a resumed run sees exactly the batches of an uninterrupted one."""
    chosen = order[index * batch_size : (index + 1) * batch_size]
    rng = np.random.default_rng([seed, epoch, index, 1])
    return normalize(augment(data.images[chosen], rng)), data.labels[chosen]


def eval_batches(data: ArrayDataset, batch_size: int):
    """The whole split in order, normalised, in batches (the last one may be smaller)."""
    for start in range(0, len(data), batch_size):
        yield normalize(data.images[start : start + batch_size]), data.labels[start : start + batch_size]
