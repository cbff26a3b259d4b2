"""The data pipeline: shapes, ranges, determinism, augmentation, the real TFDS reader, the missing-data error."""

import os

import numpy as np
import pytest

from fdbp_jax import data as data_lib


def dataset(n=40):
    rng = np.random.default_rng(0)
    return data_lib.ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.int32) % 10)


def test_train_batches_are_deterministic_shuffled_and_normalised():
    data = dataset()
    order = data_lib.epoch_order(len(data), seed=3, epoch=0)
    x, y = data_lib.train_batch(data, order, 3, 0, 1, 8)
    x2, y2 = data_lib.train_batch(data, data_lib.epoch_order(len(data), 3, 0), 3, 0, 1, 8)
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and y.shape == (8,)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(y, data.labels[order[8:16]])
    assert not np.array_equal(order, data_lib.epoch_order(len(data), 3, 1))
    assert sorted(order) == list(range(len(data)))
    low = (0 - data_lib.CIFAR10_MEAN) / data_lib.CIFAR10_STD
    high = (1 - data_lib.CIFAR10_MEAN) / data_lib.CIFAR10_STD
    assert (x >= low.min() - 1e-6).all() and (x <= high.max() + 1e-6).all()
    assert data_lib.ticks_per_epoch(40, 16) == 2


def test_augment_crops_and_flips():
    images = np.random.default_rng(1).integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    out = data_lib.augment(images, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    # every output is a shifted (zero-filled) and possibly mirrored copy of its input
    for image, crop in zip(images, out):
        candidates = []
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        for dy in range(9):
            for dx in range(9):
                window = padded[dy : dy + 32, dx : dx + 32]
                candidates += [window, window[:, ::-1]]
        assert any(np.array_equal(crop, c) for c in candidates)
    assert not np.array_equal(out, images)


def test_eval_batches_cover_the_split_in_order():
    data = dataset(20)
    batches = list(data_lib.eval_batches(data, 8))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), data.labels)


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(data_lib.DatasetUnavailable, match="is not prepared under .* set TFDS_DATA_DIR"):
        data_lib.load_tfds("cifar10", "train", 10, data_dir=str(tmp_path), download=False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset 'mnist' is not supported"):
        data_lib.load_tfds("mnist", "train")


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(os.environ.get("TFDS_DATA_DIR", "/nonexistent"), "cifar10")),
    reason="CIFAR-10 is not prepared under TFDS_DATA_DIR (CI sets it to ../shared/tfds)",
)
def test_reads_real_cifar10_through_tfds():
    data = data_lib.load_tfds("cifar10", "test", 64, download=False)
    assert data.images.shape == (64, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int32 and set(data.labels) <= set(range(10)) and len(set(data.labels)) > 3
    assert 60 < data.images.mean() < 200


def test_jpeg_tarball_reader(tmp_path):
    import io
    import tarfile

    from PIL import Image

    path = tmp_path / "mini.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for split, cls, i in [("train", "cat", 0), ("train", "ship", 1), ("test", "frog", 0)]:
            buffer = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 40 * (i + 1), np.uint8)).save(buffer, format="JPEG", quality=95)
            info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
            info.size = len(buffer.getvalue())
            archive.addfile(info, io.BytesIO(buffer.getvalue()))
    train = data_lib.load_jpeg_tarball(str(path), "train")
    assert train.images.shape == (2, 32, 32, 3) and list(train.labels) == [3, 8]
    assert abs(int(train.images[1].mean()) - 80) <= 2
    with pytest.raises(data_lib.DatasetUnavailable, match="holds no val"):
        data_lib.load_jpeg_tarball(str(path), "val")


def cifar10_binary(folder, per_batch: int, test: int):
    """A tiny archive folder in the cifar-10-binary layout TFDS's builder reads: label byte + 3072 pixels."""
    root = folder / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    record = lambda i: np.concatenate([[i % 10], rng.integers(0, 256, 3072)]).astype(np.uint8)
    for name, count in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", test)]:
        np.stack([record(i) for i in range(count)]).tofile(root / name)
    (root / "batches.meta.txt").write_text("\n".join(data_lib.CIFAR10_CLASSES) + "\n\n")
    return str(folder)


def test_download_and_prepare_path_works_offline(tmp_path):
    """TFDS's real prepare path, with the download replaced by a local archive: a dependency it needs
    that the project does not install fails here, not on a user's machine."""
    import tensorflow_datasets as tfds
    from unittest import mock

    archive = cifar10_binary(tmp_path / "download", per_batch=3, test=4)
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", lambda self, url: archive):
        train = data_lib.load_tfds("cifar10", "train", data_dir=str(tmp_path / "tfds"))
        test = data_lib.load_tfds("cifar10", "test", data_dir=str(tmp_path / "tfds"))
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8 and len(test) == 4
    assert sorted(train.labels.tolist()) == sorted([i % 10 for i in range(3)] * 5)
