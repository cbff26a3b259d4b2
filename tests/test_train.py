"""The training system end to end on tiny data: CLI files, resume equality, presets and schedules."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
import toy

import fdbp_jax as fj

from fdbp_jax import data as data_lib
from fdbp_jax import cli, optim, train
from fdbp_jax.config import PRESETS, Config
from fdbp_jax.losses import cross_entropy
from fdbp_jax.trainer import Trainer


def tiny_cifar(n: int, seed: int) -> data_lib.ArrayDataset:
    rng = np.random.default_rng(seed)
    return data_lib.ArrayDataset(
        rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.int32)
    )


TINY = dict(model="cnn", stages=2, data_parallel=2, batch_size=16, lr=0.05, schedule="constant", log_every=2,
            eval_batch_size=16)


def test_cli_end_to_end_on_mock_tfds(tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path / "run")
    monkeypatch.setattr(data_lib, "reachable", lambda host: None)  # mock_data stands in for the download
    with tfds.testing.mock_data(num_examples=48):
        code = cli.main([
            "--model", "cnn", "--stages", "2", "--data-parallel", "2", "--epochs", "2", "--batch-size", "16",
            "--train-examples", "32", "--eval-examples", "20", "--eval-batch-size", "8", "--log-every", "1",
            "--workdir", workdir, "--no-progress",
        ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and json.loads(printed.strip().splitlines()[-1])["test_accuracy"] is not None
    events = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {e["event"] for e in events} == {"train", "eval"}
    assert all("epoch" in e and "tick" in e for e in events)
    assert [e["tick"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert events[0]["loss"] is None  # K=2: the first tick is warm-up, no loss yet
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    for key in ("test_accuracy", "best_test_accuracy", "final_train_loss", "wall_time_s", "images_per_s",
                "config", "jax_version", "devices"):
        assert summary[key] is not None, key
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and len(summary["devices"]) == 4
    assert summary["config"]["stages"] == 2 and summary["config"]["train_examples"] == 32
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4"]  # named by tick
    # the same metrics, read back from the TensorBoard event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(os.path.join(workdir, "tensorboard"))
    board.Reload()
    scalars = lambda tag: [(s.step, pytest.approx(s.value, rel=1e-6)) for s in board.Scalars(tag)]
    assert scalars("train/loss") == [(e["tick"], e["loss"]) for e in events if e["event"] == "train" and e["loss"]]
    assert scalars("eval/test_accuracy") == [(e["tick"], e["test_accuracy"]) for e in events if e["event"] == "eval"]
    config = Config.from_json(summary["config"])
    for k in range(2):  # the staleness control: stage 0's step is 1/3 of stage 1's once both update
        assert [v for _, v in scalars(f"learning_rate/stage{k}")][-1] == optim.learning_rates(config, 2, 4)[k]
    schedule = optim.lr_schedule(config, 2)  # after tick 4, stage 0 (delay 2) made 2 updates, stage 1 made 3
    assert optim.learning_rates(config, 2, 4) == pytest.approx([float(schedule(2)) / 3, float(schedule(3))])


# fdbp: test_reliability kills and resumes real runs
@pytest.mark.parametrize("algorithm", [dict(algorithm="bp"), dict(algorithm="gpipe", microbatches=2)], ids=str)
def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, algorithm):
    datasets = (tiny_cifar(48, 0), tiny_cifar(16, 1))
    config = Config(**TINY, epochs=2, **algorithm)
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"), datasets=datasets, show_progress=False)
    first = Config(**TINY, epochs=1, **algorithm, tensorboard=False)
    train.train_and_evaluate(first, str(tmp_path / "split"), datasets=datasets, show_progress=False)
    assert not os.path.exists(tmp_path / "split" / "tensorboard")  # --no-tensorboard
    resumed = train.train_and_evaluate(config, str(tmp_path / "split"), resume=True, datasets=datasets, show_progress=False)
    expected = whole.trainer.stage_variables(whole.state)
    got = resumed.trainer.stage_variables(resumed.state)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["epoch"] for h in resumed.summary["history"]] == [1, 2]
    assert resumed.summary["history"] == [
        {**h, "images_per_s": r["images_per_s"], "wall_time_s": r["wall_time_s"]}
        for h, r in zip(whole.summary["history"], resumed.summary["history"])
    ]


def test_resume_refuses_other_settings(tmp_path):
    datasets = (tiny_cifar(32, 0), tiny_cifar(16, 1))
    train.train_and_evaluate(Config(**TINY, epochs=1), str(tmp_path), datasets=datasets, show_progress=False)
    with pytest.raises(ValueError, match=r"other settings: lr 0.05 \(checkpoint\) vs 0.1 \(now\)"):
        train.train_and_evaluate(Config(**{**TINY, "lr": 0.1}, epochs=2), str(tmp_path), resume=True,
                                 datasets=datasets, show_progress=False)
    # --stash auto (the default) ran the fastest stash that fits, selective on this host; a resume must
    # keep that mode's rings: auto takes it, another mode is refused by name
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["stash"] == "selective"
    # and its cut: a cost-balanced one (by --split-by time: measured anew each run) is the checkpoint's
    from fdbp_jax.checkpoint import Checkpoints

    checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
    resumed = checkpoints.config_to_resume(Config(**TINY, epochs=2))
    assert resumed.stash == "selective" and list(resumed.boundaries) == summary["boundaries"]
    pinned = checkpoints.config_to_resume(Config(**TINY, epochs=2, boundaries=(1,)))
    assert pinned.boundaries == (1,)  # a --boundaries given is kept (and compared with the checkpoint's settings)
    checkpoints.close()
    with pytest.raises(ValueError, match=r"other settings: stash 'selective' \(checkpoint\) vs 'recompute' \(now\)"):
        train.train_and_evaluate(Config(**TINY, epochs=2, stash="recompute"), str(tmp_path), resume=True,
                                 datasets=datasets, show_progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train.train_and_evaluate(Config(**TINY, epochs=1), str(tmp_path), datasets=datasets, show_progress=False)


def test_show_split_prints_stages(capsys):
    assert cli.main(["--model", "resnet20", "--stages", "4", "--show-split"]) == 0
    out = capsys.readouterr().out
    assert out.count("BasicBlock") >= 4 and "balance (mean/max stage FLOPs, with the stash work)" in out


def test_show_split_can_cut_inside_residual_blocks(capsys):
    """--split-unit half-block: ResNet-20 as 20 blocks (stem, 9 x 2 halves, head), and a boundary can fall
    between a basic block's convs (block 6: inside the third basic block)."""
    flags = ["--model", "resnet20", "--stages", "2", "--split-unit", "half-block", "--show-split"]
    assert cli.main([*flags, "--boundaries", "6"]) == 0
    out = capsys.readouterr().out
    assert "0-5" in out and "ConvBN .. BasicBlockIn" in out and "6-19" in out and "BasicBlockOut .. Head" in out, out


def test_presets_are_valid_configs():
    assert PRESETS["paper"]["model"] == "resnet56" and PRESETS["paper"]["step_epochs"] == (150, 225, 275)
    for values in PRESETS.values():
        Config(**values)


def test_step_schedule_divides_by_ten_at_the_given_epochs():
    schedule = optim.lr_schedule(Config(lr=0.1, schedule="step", epochs=4, step_epochs=(2, 3)), ticks_per_epoch=10)
    np.testing.assert_allclose([schedule(i) for i in (0, 19, 20, 29, 30, 39)], [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    warm = optim.lr_schedule(Config(lr=0.1, schedule="cosine", epochs=2, warmup_epochs=1), ticks_per_epoch=10)
    assert float(warm(0)) == pytest.approx(0.01) and float(warm(10)) == pytest.approx(0.1)
    assert float(warm(19)) < 0.01


def test_every_setting_has_one_flag_and_help_works(capsys):
    parser = cli.build_parser()
    flags = {action.dest: action.option_strings for action in parser._actions}
    for field in dataclasses.fields(Config):
        assert field.name in flags and field.metadata["help"], field.name
    assert flags["tensorboard"] == ["--no-tensorboard"] and flags["batch_size"] == ["--batch-size"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "--staleness-power" in capsys.readouterr().out


class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("scale", nn.initializers.ones, ())


class BrightnessOracle(nn.Module):
    """Classifies an image of constant brightness 20 * c as class c (what `oracle_images` make)."""

    @nn.compact
    def __call__(self, x):
        spec = data_lib.DATASETS["cifar10"]
        centres = (np.arange(10) * 20 / 255.0 - spec.mean[0]) / spec.std[0]
        return -jnp.abs(x[:, 0, 0, :1] - centres[None, :]) * self.param("scale", nn.initializers.ones, ())


def oracle_images(classes: np.ndarray) -> np.ndarray:
    return np.broadcast_to((classes * 20).astype(np.uint8)[:, None, None, None], (len(classes), 32, 32, 3)).copy()


@pytest.mark.parametrize("algorithm,mesh_shape", [("fdbp", (2, 2)), ("bp", (2, 2)), ("fdbp", None)], ids=str)
def test_evaluate_gives_the_accuracy_of_a_known_predictor(algorithm, mesh_shape):
    """50 images (3 batches of 16 and a padded one) of which 37 carry the class the oracle predicts."""
    classes = np.arange(50) % 10
    labels = np.where(np.arange(50) < 37, classes, (classes + 1) % 10).astype(np.int32)
    dataset = data_lib.ArrayDataset(oracle_images(classes), labels)
    trainer = Trainer([Identity(), BrightnessOracle()], cross_entropy, optax.sgd(0.0), algorithm=algorithm,
                      mesh=fj.make_mesh(*mesh_shape) if mesh_shape else None)
    state = trainer.init(jax.random.key(0), np.zeros((16, 32, 32, 3), np.float32))
    config = Config(model="cnn", stages=2, data_parallel=2, eval_batch_size=16)
    assert train.evaluate(trainer, state, dataset, config) == 37 / 50


def test_vit_cuts_evenly_into_eight_stages(capsys):
    assert cli.main(["--model", "vit", "--stages", "8", "--show-split"]) == 0
    out = capsys.readouterr().out
    assert out.count("TransformerBlock") >= 8 and "PatchEmbedding" in out and "TokenHead" in out
    balance = float(out.split("balance (mean/max stage FLOPs, with the stash work):")[1].split()[0])
    assert balance > 0.95, out


DEEP = dict(model="vit", data_parallel=1, batch_size=8, lr=0.05, schedule="constant", epochs=1, train_examples=160,
            eval_examples=8, eval_batch_size=8, log_every=5, tensorboard=False)


def test_vit_at_k8_on_the_mesh_follows_the_emulator_with_weight_prediction(tmp_path):
    """fdbp-train's path at K = 8 on the 8-device CPU mesh with --correction predict: the same weights
    as the emulator of the same settings (that predict changes the weights: the K = 16 test). The recompute
    stash: auto's selective compiles 20 s longer here, and matches the emulator in tests/test_engine.py."""
    data = (tiny_cifar(160, 0), tiny_cifar(8, 1))
    run = lambda name, **settings: train.train_and_evaluate(
        Config(**{**DEEP, "stages": 8, "correction": "predict", "stash": "recompute", **settings}),
        str(tmp_path / name), datasets=data, show_progress=False)
    mesh, emulated = run("mesh"), run("emulated", emulate=True)
    weights = lambda result: result.trainer.stage_variables(result.state)
    assert mesh.summary["config"]["correction"] == "predict" and np.isfinite(mesh.summary["final_train_loss"])
    # absolute: the attention key biases get exactly zero gradients and stay near 0, so relative errors blow up
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), weights(mesh), weights(emulated))


def test_vit_at_k16_in_the_emulator_trains_with_and_without_weight_prediction(tmp_path):
    data = (tiny_cifar(128, 0), tiny_cifar(8, 1))
    runs = {}
    for correction in ("none", "predict"):  # 32 ticks of 4: stage 0 (delay 30) updates twice, the others more
        config = Config(**{**DEEP, "stages": 16, "emulate": True, "correction": correction, "train_examples": 128,
                           "batch_size": 4})
        runs[correction] = train.train_and_evaluate(config, str(tmp_path / correction), datasets=data,
                                                    show_progress=False)
    losses = [r.summary["final_train_loss"] for r in runs.values()]
    assert np.isfinite(losses).all(), losses
    weights = [r.trainer.stage_variables(r.state) for r in runs.values()]
    assert toy.max_relative_error(weights[0][:15], weights[1][:15]) > 1e-4, "predict changed no stage's weights"
