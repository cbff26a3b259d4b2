"""The data sources and the grain pipeline: shapes, ranges, determinism, augmentation, per-process rows,
iterator state, the real TFDS reader and its prepare path, the missing-data error."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fdbp_jax import data as data_lib
from fdbp_jax import input_pipeline as pipeline


def dataset(n=40):
    rng = np.random.default_rng(0)
    return data_lib.ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.int32) % 10)


SPEC = data_lib.DATASETS["cifar10"]


class Recording(data_lib.ArrayDataset):
    """A source that remembers which records were read."""

    def gather(self, indices):
        self.read.update(int(i) for i in indices)
        return super().gather(indices)


def test_train_batches_are_deterministic_shuffled_and_normalised():
    data = dataset()
    epoch0 = pipeline.train_dataset(data, SPEC, seed=3, epoch=0, batch_size=8)
    assert len(epoch0) == pipeline.ticks_per_epoch(40, 8) == 5
    x, y = epoch0[1]
    x2, y2 = pipeline.train_dataset(data, SPEC, seed=3, epoch=0, batch_size=8)[1]
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and y.shape == (8,) and y.dtype == np.int32
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    labels = np.concatenate([epoch0[t][1] for t in range(5)])
    assert sorted(labels) == sorted(data.labels)  # every record once per epoch
    assert not np.array_equal(labels, data.labels)  # shuffled
    assert not np.array_equal(labels, np.concatenate([b[1] for b in pipeline.train_dataset(data, SPEC, 3, 1, 8)]))
    low, high = (0 - SPEC.mean) / SPEC.std, (1 - SPEC.mean) / SPEC.std
    assert (x >= low.min() - 1e-6).all() and (x <= high.max() + 1e-6).all()


def test_augment_crops_and_flips():
    images = np.random.default_rng(1).integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    offsets, flips = pipeline.augmentation(seed=0, epoch=0, tick=0, batch_size=64)
    assert offsets.min() >= 0 and offsets.max() <= 2 * pipeline.PAD and 0 < flips.sum() < 64
    out = pipeline.crop_and_flip(images, offsets, flips)
    assert out.shape == images.shape and out.dtype == images.dtype
    # every output is its input shifted by its offset (zero-filled), mirrored where flipped
    for image, crop, (dy, dx), flip in zip(images, out, offsets, flips):
        window = np.pad(image, ((4, 4), (4, 4), (0, 0)))[dy : dy + 32, dx : dx + 32]
        np.testing.assert_array_equal(crop, window[:, ::-1] if flip else window)
    assert not all(np.array_equal(a, b) for a, b in zip(out, images))
    again = pipeline.augmentation(seed=0, epoch=0, tick=0, batch_size=64)
    other = pipeline.augmentation(seed=0, epoch=0, tick=1, batch_size=64)
    assert np.array_equal(again[0], offsets) and not np.array_equal(other[0], offsets)


def test_eval_batches_cover_the_split_in_order_padded():
    data = dataset(20)
    batches = [pipeline.eval_dataset(data, SPEC, 8)[t] for t in range(3)]
    assert [len(y) for _, y, _ in batches] == [8, 8, 8]
    valid = np.concatenate([v for _, _, v in batches])
    assert valid.sum() == 20 and not valid[20:].any()
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in batches])[:20], data.labels)


def test_each_process_reads_only_its_rows_of_the_global_batch():
    images, labels = dataset(48).images, dataset(48).labels
    whole = pipeline.train_dataset(data_lib.ArrayDataset(images, labels), SPEC, 0, 0, 16)
    parts, reads = [], []
    for rows in (range(0, 8), range(8, 16)):  # two processes, each feeding half of every global batch
        source = Recording(images, labels)
        source.read = set()
        parts.append([pipeline.train_dataset(source, SPEC, 0, 0, 16, rows)[t] for t in range(3)])
        reads.append(source.read)
    for t in range(3):
        np.testing.assert_array_equal(np.concatenate([parts[0][t][0], parts[1][t][0]]), whole[t][0])
        np.testing.assert_array_equal(np.concatenate([parts[0][t][1], parts[1][t][1]]), whole[t][1])
    assert len(reads[0]) == len(reads[1]) == 24 and not reads[0] & reads[1]


def test_iterator_state_continues_exactly():
    epoch = pipeline.train_dataset(dataset(), SPEC, 0, 0, 8)
    iterator = pipeline.iterate(epoch)
    next(iterator), next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = next(pipeline.iterate(epoch, state))
    np.testing.assert_array_equal(resumed[0], expected[0])
    np.testing.assert_array_equal(resumed[1], expected[1])


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(data_lib.DatasetUnavailable, match="is not prepared under .* set TFDS_DATA_DIR"):
        data_lib.load_tfds("cifar10", "train", 10, data_dir=str(tmp_path), download=False)


@pytest.mark.parametrize("script", ["compare.py", "staleness_study.py"])
def test_experiment_scripts_without_data_end_in_one_line(tmp_path, script):
    """The main job's path (experiments/quick.sh runs compare.py) on a machine that can neither find nor
    download CIFAR-10: one line saying what to do, exit code 2, no traceback."""
    if data_lib.reachable(data_lib.DATASETS["cifar10"].download_host, timeout_s=2.0) is None:
        pytest.skip("CIFAR-10's download host is reachable here: the script would download it")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "no-data"), "PYTHONPATH": root}
    done = subprocess.run([sys.executable, os.path.join(root, "experiments", script), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: dataset 'cifar10' is not prepared under") and "set TFDS_DATA_DIR" in last


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


def test_download_and_prepare_path_works_offline(tmp_path, monkeypatch):
    """TFDS's real prepare path, with the download replaced by a local archive: a dependency it needs
    that the project does not install fails here, not on a user's machine."""
    import tensorflow_datasets as tfds
    from unittest import mock

    archive = cifar10_binary(tmp_path / "download", per_batch=3, test=4)
    monkeypatch.setattr(data_lib, "reachable", lambda host: None)  # the download itself is replaced below
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", lambda self, url: archive):
        train = data_lib.load_tfds("cifar10", "train", data_dir=str(tmp_path / "tfds"))
        test = data_lib.load_tfds("cifar10", "test", data_dir=str(tmp_path / "tfds"))
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8 and len(test) == 4
    assert sorted(train.labels.tolist()) == sorted([i % 10 for i in range(3)] * 5)
