"""Datasets: the registry (`DatasetSpec`: shape, classes, statistics) and the sources of records,
CIFAR-10 read through `tfds.data_source` (or from a JPEG tarball) and decoded once into memory as a
random-access `ArrayDataset` that the grain pipeline (`input_pipeline.py`) reads."""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What training needs to know of an image dataset: its TFDS name, image shape, classes and the
    per-channel statistics its images are standardised with."""

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    download_host: str  # where TFDS downloads it from

    @property
    def classes(self) -> int:
        return len(self.class_names)


DATASETS = {"cifar10": DatasetSpec("cifar10", (32, 32, 3), CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD,
                                   "www.cs.toronto.edu")}


def reachable(host: str, port: int = 443, timeout_s: float = 5.0) -> str | None:
    """None if a connection to host:port opens within the timeout, else why not."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except OSError as err:
        return str(err) or type(err).__name__


class DatasetUnavailable(RuntimeError):
    """The dataset is neither prepared locally nor downloadable."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Images (n, H, W, C) uint8 and integer labels (n,), all in host memory."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int32]:
        """One (image, label) record."""
        return self.images[index], self.labels[index]

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of the records at `indices`, as new arrays: one batch's read."""
        return self.images[indices], self.labels[indices]


def load_tfds(
    name: str, split: str, examples: int | None = None, data_dir: str | None = None, download: bool = True
) -> ArrayDataset:
    """Read `split` of a TFDS image dataset into memory (first `examples` only, if given).

    Honours TFDS_DATA_DIR (or `data_dir`); downloads and prepares it where the internet is reachable.
    """
    import tensorflow_datasets as tfds

    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is not supported: use one of {', '.join(DATASETS)}")
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None  # read now: tfds reads it once, at import
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            if not download:
                raise FileNotFoundError("download=False")
            unreachable = reachable(DATASETS[name].download_host)
            if unreachable:  # fail now rather than after TFDS's minutes of retries
                raise ConnectionError(f"cannot reach {DATASETS[name].download_host}: {unreachable}")
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
