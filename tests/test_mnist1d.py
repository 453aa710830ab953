"""MNIST-1D: offline, deterministic generation; the cache; the signal pipeline; the 1-D ResNet through the trainer."""

import os
import random
import socket

import jax
import jax.flatten_util
import numpy as np
import pytest
from conftest import REPO

from lbsgd import train
from lbsgd.data import loaders, mnist1d, pipeline
from lbsgd.errors import ConfigError, DataError
from lbsgd.models import factory
from lbsgd.parallel import layout as layout_lib
from lbsgd.trainer import build as build_lib
from lbsgd.trainer import grads
from lbsgd.trainer import setup as setup_lib

SMALL = "mnist1d:3000,500"  # the trained split: 3,000 / 500, seed 42


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data dir with the small split cached once for the module."""
    path = str(tmp_path_factory.mktemp("mnist1d"))
    loaders.load(SMALL, path)
    return path


@pytest.fixture
def offline(monkeypatch):
    """No socket can connect and ``requests`` cannot be called: generation must need neither."""
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("MNIST-1D generation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)


def mnist1d_config(data_dir, **overrides):
    """experiments/mnist1d.py on the small split, evaluated once at the end, no checkpoint before it."""
    import sys

    sys.path.insert(0, REPO)
    from experiments import mnist1d as cfg

    c = cfg.get_config()
    c.dataset, c.data_dir = SMALL, data_dir
    c.eval_every_epochs, c.checkpoint_every_steps, c.log_every_steps = 0, 10_000, 50
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def test_generation_is_deterministic_per_seed_offline_and_leaves_the_random_state(offline):
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state(), random.getstate()
    a, b, other = mnist1d.generate(200, 100, seed=7), mnist1d.generate(200, 100, seed=7), mnist1d.generate(200, 100, 8)
    after = np.random.get_state()
    assert before_np[0] == after[0] and np.array_equal(before_np[1], after[1]) and before_np[2:] == after[2:]
    assert random.getstate() == before_py
    assert a["x"].shape == (200, 40) and a["x_test"].shape == (100, 40) and a["x"].dtype == np.float32
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["x"], other["x"])
    assert np.bincount(np.concatenate([a["y"], a["y_test"]]), minlength=10).tolist() == [30] * 10


def test_a_split_is_the_packages_own_train_test_split(offline):
    """``mnist1d`` (4,000 / 1,000) is make_dataset's default 0.8 split of 5,000; checked here on 300 examples."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    args = get_dataset_args()
    args.num_samples = 300
    reference = make_dataset(args)  # 240 / 60, seed 42
    np.random.set_state(state)
    ours = mnist1d.generate(240, 60)
    for key in ours:
        np.testing.assert_array_equal(ours[key], reference[key].astype(ours[key].dtype))
    assert mnist1d.SPLITS["mnist1d"] == (4000, 1000) and mnist1d.SEED == args.seed == 42


def test_cache_round_trips_and_is_regenerated_when_stale_or_damaged(tmp_path, monkeypatch, offline):
    d = str(tmp_path)
    first = mnist1d.cached(100, 50, seed=3, data_dir=d)
    path = mnist1d.cache_path(d, 100, 50, 3)
    assert os.path.exists(path) and not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    real = mnist1d.generate
    monkeypatch.setattr(mnist1d, "generate", lambda *a: pytest.fail("regenerated a valid cache"))
    again = mnist1d.cached(100, 50, seed=3, data_dir=d)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    calls = []
    monkeypatch.setattr(mnist1d, "generate", lambda *a: calls.append(a) or real(*a))
    with open(path, "r+b") as f:  # damaged
        f.truncate(100)
    np.testing.assert_array_equal(mnist1d.cached(100, 50, seed=3, data_dir=d)["x"], first["x"])
    monkeypatch.setattr(mnist1d, "CACHE_VERSION", mnist1d.CACHE_VERSION + 1)  # stale
    mnist1d.cached(100, 50, seed=3, data_dir=d)
    assert len(calls) == 2


def test_names_and_one_line_errors(tmp_path, data_dir):
    ds = loaders.load(SMALL, data_dir)
    assert (ds.kind, ds.length, ds.channels, ds.num_classes) == ("signal", 40, 1, 10)
    assert (ds.train.num_examples, ds.eval.num_examples) == (3000, 500)
    assert ds.input_shape(40) == (40, 1) and ds.size_problem(8) and not ds.size_problem(40)
    for bad in ("mnist1d:abc", "mnist1d:101,100", "mnist1d:0,100"):
        with pytest.raises(DataError) as e:
            loaders.load(bad, data_dir)
        assert "\n" not in str(e.value) and "mnist1d" in str(e.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="cannot write the MNIST-1D cache"):
        loaders.load("mnist1d:20,10", str(tmp_path / "file"))


def test_config_checks_model_size_and_augment_in_one_line(data_dir):
    ds = loaders.load(SMALL, data_dir)
    for overrides, words in [
        ({"model": "resnet8"}, "reads images"),
        ({"image_size": 8}, "image_size=40"),
        ({"augment": "inception"}, "augment=none or shift"),
        ({"model_stem": "imagenet"}, "model_stem"),
    ]:
        with pytest.raises(ConfigError, match=words):
            setup_lib.check_input(mnist1d_config(data_dir, **overrides), ds)
    setup_lib.check_input(mnist1d_config(data_dir), ds)
    assert factory.input_shape("resnet1d_8", 40, 1) == (40, 1) and factory.input_shape("resnet8", 8, 1) == (8, 8, 1)


def test_pipeline_serves_the_generated_signals(data_dir):
    ds, data = loaders.load(SMALL, data_dir), mnist1d.cached(3000, 500, data_dir=data_dir)
    batch = next(pipeline.eval_iterator(ds, global_batch_size=500, first_slot=0, num_local_slots=500,
                                        augment="shift", image_size=40))  # fmt: skip
    np.testing.assert_array_equal(batch["image"][..., 0], data["x_test"])
    np.testing.assert_array_equal(batch["label"], data["y_test"])
    kw = {
        "num_workers": 8,
        "per_worker_batch_size": 16,
        "seed": 0,
        "first_worker": 0,
        "num_local_workers": 8,
        "start_step": 0,
    }
    shifted = next(pipeline.train_iterator(ds, augment="shift", image_size=40, **kw))
    plain = next(pipeline.train_iterator(ds, augment="none", image_size=40, **kw))
    assert shifted["image"].shape == (128, 40, 1) and shifted["image"].dtype == np.float32
    np.testing.assert_array_equal(shifted["label"], plain["label"])
    x, s = plain["image"][..., 0], shifted["image"][..., 0]
    pad = np.pad(x, ((0, 0), (1, 1)))
    candidates = np.stack([pad[:, i : i + 40] for i in range(3)])  # shifted by -1, 0 or +1 position
    assert np.all(np.any(np.all(candidates == s[None], axis=2), axis=0))


def test_resnet1d_trains_to_90_percent_on_a_small_split(data_dir, tmp_path):
    results = train.train_and_evaluate(mnist1d_config(data_dir, num_epochs=8, augment="none"), str(tmp_path))
    assert results["eval_accuracy"] >= 0.90, results["eval_accuracy"]


def _two_steps(num_devices, data):
    config = mnist1d_config("", model_width=8, num_devices=num_devices)
    lay = layout_lib.make_layout(config.num_workers, num_devices)
    program = build_lib.build(config, lay, num_classes=10, channels=1, steps_per_epoch=10)
    state = program.init_state()
    for s in range(2):
        x, y = data["x"][s * 128 : (s + 1) * 128, :, None], data["y"][s * 128 : (s + 1) * 128].astype(np.int32)
        b = layout_lib.global_batch(lay, {"image": x, "label": y})
        state, _ = program.train_step(state, b["image"], b["label"])
        jax.block_until_ready(state)
    return jax.flatten_util.ravel_pytree(jax.device_get((state.params, state.batch_stats)))[0]


def test_resnet1d_same_run_on_1_and_8_devices(data_dir):
    data = mnist1d.cached(3000, 500, data_dir=data_dir)
    assert np.abs(_two_steps(1, data) - _two_steps(8, data)).max() <= 1e-5


def test_resnet1d_takes_bn_groups_spanning_devices():
    model = factory.from_config(mnist1d_config(""), num_classes=10)
    grouped = grads.group_model(model, group_size=4, workers_per_device=1, num_devices=8, axis="devices")
    assert (grouped.bn_axis_name, grouped.bn_axis_index_groups) == ("devices", ((0, 1, 2, 3), (4, 5, 6, 7)))
