"""ImageNet (issue #4): the configs against the paper, ResNet-50's size and cost, mixed precision, and one
real ResNet-50 train step + eval at 224x224 through the real imagenet2012 pipeline on mocked TFDS data."""

import glob
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, fork_runner
from lbsgd import optim, train, validate
from lbsgd.data import order
from lbsgd.models import resnet

IMAGENET_TRAIN = 1_281_167  # imagenet2012 'train' (TFDS 5.1.0)
IMAGENET_VAL = 50_000
RECIPE = dict(  # Goyal et al. §5.1, as the issue lists it
    dataset="imagenet2012",
    augment="inception",
    image_size=224,
    model="resnet50",
    per_worker_batch_size=32,
    num_epochs=90,
    base_learning_rate=0.1,
    base_batch_size=256,
    warmup="gradual",
    warmup_epochs=5,
    decay="step",
    decay_epochs=(30, 60, 80),
    decay_factor=0.1,
    optimizer="goyal_sgd",
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-4,
    momentum_correction=True,
    label_smoothing=0.0,
    dtype="bfloat16",
)


def load_config(name):
    path = os.path.join(REPO, "experiments", name)
    spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# --------------------------------------------------------------------------- configs


CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "*.py")) if not p.endswith("__init__.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_experiment_config_validates(path):
    name = os.path.basename(path)
    with open(path) as f:
        assert f.read().lstrip("r").startswith('"""'), f"{name} must start with its docstring"
    validate.check_config(load_config(name))


@pytest.mark.parametrize("name,k,devices,processes", [("imagenet_256.py", 8, 8, 1), ("imagenet_8k.py", 256, 256, 32)])
def test_imagenet_configs_are_the_papers_recipe(name, k, devices, processes):
    c = load_config(name)
    for field, want in RECIPE.items():
        assert c[field] == (tuple(want) if isinstance(want, tuple) else want), field
    assert c.num_workers == k and c.num_workers * c.per_worker_batch_size == {8: 256, 256: 8192}[k]
    validate.check_layout(c, devices, processes)  # the hardware the docstring names
    assert train.resolve_accumulation(k // devices, 32, c.accumulation_steps, c.max_device_batch) == 1
    with open(os.path.join(REPO, "experiments", name)) as f:
        doc = f.read().split('"""')[1]
    assert "python -m lbsgd.main --config=experiments/" + name in doc
    assert ("23.60 ± 0.12" if k == 8 else "23.74 ± 0.09") in doc


def test_8k_config_is_the_256_config_with_more_workers():
    """One source of truth: 8k differs from 256 in k and bookkeeping only."""
    a, b = load_config("imagenet_256.py").to_dict(), load_config("imagenet_8k.py").to_dict()
    assert set(a) == set(b)
    differ = {f for f in a if a[f] != b[f]}
    assert differ <= {"num_workers", "eval_batch_size", "log_every_steps", "checkpoint_every_steps"}
    assert "num_workers" in differ


def test_8k_schedule_and_epoch_math_match_the_paper():
    c = load_config("imagenet_8k.py")
    kn = c.num_workers * c.per_worker_batch_size
    spe = order.steps_per_epoch(IMAGENET_TRAIN, kn)
    assert (kn, spe, spe * kn + IMAGENET_TRAIN % kn) == (8192, 156, IMAGENET_TRAIN)  # drop-remainder
    _, lr = optim.from_config(c, spe)
    eta, k_eta = 0.1, 0.1 * 8192 / 256  # = 3.2
    assert k_eta == pytest.approx(3.2)
    expected = {
        0: eta,  # gradual warmup starts at η (§2.2)
        390: eta + (k_eta - eta) * 390 / 780,  # linear in between
        779: eta + (k_eta - eta) * 779 / 780,
        780: k_eta,  # 5 epochs x 156 steps
        4679: k_eta,
        4680: k_eta / 10,  # epoch 30
        9359: k_eta / 10,
        9360: k_eta / 100,  # epoch 60
        12479: k_eta / 100,
        12480: k_eta / 1000,  # epoch 80
        90 * 156 - 1: k_eta / 1000,  # the last of 14,040 steps
    }
    for step, want in expected.items():
        assert float(lr(step)) == pytest.approx(want, rel=1e-5), step


def test_256_schedule_has_no_warmup_and_decays_on_epoch_boundaries():
    c = load_config("imagenet_256.py")
    spe = order.steps_per_epoch(IMAGENET_TRAIN, 256)
    assert spe == 5004
    _, lr = optim.from_config(c, spe)
    for step, want in {0: 0.1, 30 * 5004 - 1: 0.1, 30 * 5004: 0.01, 60 * 5004: 0.001, 80 * 5004: 1e-4}.items():
        assert float(lr(step)) == pytest.approx(want, rel=1e-5), step


@pytest.mark.parametrize("k,peak,spe", [(4, 0.05, 10009), (2048, 25.6, 19)])
def test_sweep_is_a_worker_count_override(k, peak, spe):
    """kn = 128 ... 65,536 by --config.num_workers alone; η and the epoch math follow."""
    c = load_config("imagenet_8k.py")
    c.num_workers = k
    validate.check_config(c)
    assert order.steps_per_epoch(IMAGENET_TRAIN, k * 32) == spe
    d = min(k, 8)  # on one 8-device host the workers run in microsteps of <= 256 images
    assert train.resolve_accumulation(k // d, 32, c.accumulation_steps, c.max_device_batch) == max(
        1, k // d * 32 // 256
    )
    _, lr = optim.from_config(c, spe)
    assert float(lr(5 * spe + 1)) == pytest.approx(peak, rel=1e-5)


def test_command_line_override_reaches_the_data_step(tmp_path):
    """The documented command with a sweep override parses, validates, and stops at the missing data with
    one line saying how to prepare it. (``lbsgd.main.run()``, the console script's entry, forked from this test
    process's ``forkrun`` server: the same program without Python's and the libraries' start-up.)"""
    r = fork_runner().run(
        "--config=experiments/imagenet_8k.py",
        "--config.num_workers=2048",
        "--config.warmup=constant",
        f"--config.data_dir={tmp_path / 'tfds'}",
        f"--workdir={tmp_path / 'w'}",
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("lbsgd: error")]
    assert len(err) == 1 and "imagenet2012" in err[0] and "tfds build" in err[0]


# --------------------------------------------------------------------------- ResNet-50


def _init_shapes(dtype=jnp.float32):
    model = resnet.create_model("resnet50", num_classes=1000, dtype=dtype)
    return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))


def test_resnet50_parameter_count():
    _, v = _init_shapes()
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"]))
    assert abs(count - 25.6e6) <= 0.1e6
    assert count == 25_557_032  # He et al.'s ResNet-50 (torchvision's count)
    kernels = [p for p, _ in jax.tree_util.tree_leaves_with_path(v["params"]) if p[-1].key == "kernel"]
    assert len(kernels) == 1 + 16 * 3 + 4 + 1  # stem, 16 bottlenecks, 4 projections, fc


def _macs(jaxpr, valid_only):
    """Multiply-adds of every conv/dot in a jaxpr; ``valid_only`` skips taps that land on zero padding."""

    def taps(n_in, k, stride, pad_lo, n_out):
        return sum(0 <= o * stride - pad_lo + t < n_in for o in range(n_out) for t in range(k))

    total = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "conv_general_dilated":  # NHWC x HWIO (flax)
            x, w, y = e.invars[0].aval.shape, e.invars[1].aval.shape, e.outvars[0].aval.shape
            if valid_only:
                (plh, _), (plw, _) = e.params["padding"]
                sh, sw = e.params["window_strides"]
                total += x[0] * taps(x[1], w[0], sh, plh, y[1]) * taps(x[2], w[1], sw, plw, y[2]) * w[2] * w[3]
            else:
                total += math.prod(y) * w[0] * w[1] * w[2]
        elif e.primitive.name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            total += math.prod(e.outvars[0].aval.shape) * math.prod(e.invars[0].aval.shape[i] for i in contract)
        for p in e.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                total += _macs(getattr(inner, "jaxpr", inner), valid_only)
    return total


def test_resnet50_forward_cost_by_xla_cost_analysis():
    """≈ 4.1 G multiply-adds per 224x224 image (He et al. Table 1: 3.8e9 FLOPs for v1, v1.5 a little more).

    XLA's cost analysis counts 2 FLOPs per multiply-add but only for taps inside the image, not on the
    zero padding, plus the elementwise ops: ≈ 8.0 GFLOP against the dense 2 x 4.09 G = 8.18 G.
    """
    model, v = _init_shapes()
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    fwd = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    jaxpr = jax.make_jaxpr(fwd)(v, x).jaxpr
    dense, valid = _macs(jaxpr, False), _macs(jaxpr, True)
    assert dense == pytest.approx(4.09e9, rel=0.005)
    cost = jax.jit(fwd).lower(v, x).compile().cost_analysis()
    flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert 2 * valid <= flops <= 2 * valid * 1.03  # convolutions + at most 3 % elementwise
    assert 7.8e9 < flops < 8.2e9


def test_bfloat16_compute_keeps_float32_params_optimizer_and_bn_statistics():
    c = load_config("imagenet_256.py")
    model = train.build_model(c, 1000)
    assert model.dtype == jnp.bfloat16 and model.bn_momentum == 0.9
    tx, _ = optim.from_config(c, 5004)
    x = jnp.zeros((2, 224, 224, 3), jnp.float32)

    def init_and_step():
        v = model.init(jax.random.PRNGKey(0), x[:1], train=False)
        logits, new = model.apply(v, x, train=True, mutable=["batch_stats"])
        return v["params"], tx.init(v["params"]), new["batch_stats"], logits

    params, opt_state, stats, logits = jax.eval_shape(init_and_step)
    for name, tree in (("params", params), ("optimizer state", opt_state), ("BN statistics", stats)):
        bad = [
            (p, l.dtype)
            for p, l in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(l.dtype, jnp.floating) and l.dtype != jnp.float32
        ]
        assert not bad, f"{name} not float32: {bad[:3]}"
    assert logits.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))
    ).jaxpr
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 53 and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)  # compute in bf16


def test_bottleneck_zero_gamma_and_no_weight_decay_on_bn():
    """Zero-γ on every bottleneck block's last BN (§5.1); weight decay on conv/fc kernels only, not BN γ/β.

    On a narrow ResNet of the same bottleneck blocks (1, 2, 1, 1 of them): ResNet-50's init compiles for
    seconds on CPU, and the blocks' code is the same. (Basic blocks and the fc init: tests/test_models.py.)
    """
    model = resnet.ResNet(stage_sizes=(1, 2, 1, 1), block="bottleneck", num_classes=1000, width=8)
    params = train.run_once(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    blocks = [k for k in params if k.startswith("BottleneckBlock")]
    assert len(blocks) == 5
    for b in blocks:
        bns = sorted(k for k in params[b] if k.startswith("BatchNorm"))
        assert len(bns) == 3
        assert float(jnp.abs(params[b][bns[-1]]["scale"]).max()) == 0.0  # the block's last BN
        assert float(jnp.abs(params[b][bns[0]]["scale"] - 1).max()) == 0.0
    mask = optim.weight_decay_mask(params)
    decayed = [p for p, m in jax.tree_util.tree_leaves_with_path(mask) if m]
    assert len(decayed) == 1 + 5 * 3 + 4 + 1 and all(p[-1].key == "kernel" for p in decayed)


# --------------------------------------------------------------------------- mocked imagenet2012


@pytest.fixture(scope="module")
def mocked_imagenet(tmp_path_factory):
    """imagenet2012's real metadata (splits, 1000 classes, array_record) in a data dir, read through
    ``tfds.testing.mock_data``: the data source returns random JPEGs (5..50 px) and labels."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import splits as splits_lib

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    b = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    b.info.set_splits(
        splits_lib.SplitDict(
            [
                splits_lib.SplitInfo(name="train", shard_lengths=[IMAGENET_TRAIN], num_bytes=0, filename_template=None),
                splits_lib.SplitInfo(
                    name="validation", shard_lengths=[IMAGENET_VAL], num_bytes=0, filename_template=None
                ),
            ]
        )
    )
    b.data_path.mkdir(parents=True)
    b.info.write_to_directory(b.data_path)
    return data_dir


def test_resnet50_train_step_and_eval_on_mocked_imagenet(mocked_imagenet, tmp_path):
    """The 256 config, shrunk to k=2 workers x n=2 on 2 CPU devices for one step: the real imagenet2012
    loader, inception crops at 224, one bf16 ResNet-50 train step, and an eval over every mocked image."""
    import tensorflow_datasets as tfds

    from lbsgd.data import pipeline

    num_examples = 6
    c = load_config("imagenet_256.py")
    c.data_dir = mocked_imagenet
    c.num_workers, c.per_worker_batch_size, c.num_devices = 2, 2, 2
    c.eval_batch_size = 4
    c.max_steps, c.log_every_steps = 1, 1
    with tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=mocked_imagenet
    ):
        ds = pipeline.load("imagenet2012", mocked_imagenet)
        assert (ds.num_classes, ds.channels, ds.mean) == (1000, 3, pipeline.IMAGENET_MEAN)
        batch = next(
            pipeline.train_iterator(
                ds,
                num_workers=2,
                per_worker_batch_size=2,
                seed=0,
                first_worker=0,
                num_local_workers=2,
                start_step=0,
                augment="inception",
                image_size=224,
            )
        )
        assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
        results = train.train_and_evaluate(c, str(tmp_path))
    assert results["steps"] == 1 and results["global_batch_size"] == 4 and results["devices"] == 2
    assert results["num_params"] == 25_557_032
    # Zero-γ and fc N(0, 0.01²) make the first logits small (std < 0.7): the first loss is ≈ ln(1000).
    assert results["train_loss"] == pytest.approx(math.log(1000), abs=0.25)
    assert results["eval_examples"] == num_examples  # every validation example once, padding masked
    for key in ("eval_top1_error", "eval_top5_error"):
        assert 0.0 <= results[key] <= 1.0 and results[key] * num_examples == pytest.approx(
            round(results[key] * num_examples)
        )
    assert results["eval_top5_error"] <= results["eval_top1_error"]
    with open(tmp_path / "results.json") as f:
        on_disk = json.load(f)
    assert on_disk["eval_top1_error"] == results["eval_top1_error"]
    assert on_disk["eval_top5_error"] == results["eval_top5_error"]
