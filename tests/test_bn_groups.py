"""BatchNorm groups (``config.bn_group_size`` = g): batch statistics over the g·n examples of g consecutive
workers, against a reference that runs one BatchNorm per group on one device (and numpy for the stem),
the same run on any layout, g = 1 bitwise today's step, and the one-line refusals."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import fork_runner, tiny_config
from test_multiprocess import TINY_ARGS, _summary, _two_processes

from lbsgd import errors, strategies, train
from lbsgd.config import schema, validate
from lbsgd.models import resnet
from lbsgd.parallel.layout import make_layout

K, N = 8, 4
MODEL = resnet.create_model("resnet4", num_classes=10, width=4)
SHAPE = (8, 8, 1)


def keep_gradient():
    """An optax 'optimizer' that leaves the parameters alone and keeps the step's gradient as its state."""
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p), update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )


def batches(steps, k=K, n=N, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(k * n, *SHAPE)).astype(np.float32), rng.integers(0, 10, size=(k * n,)).astype(np.int32))
        for _ in range(steps)
    ]


def run(d, data, tx, k=K, accumulation_steps=1, **group):
    """Train steps on ``d`` of the 8 simulated devices; ``group`` is ``bn_group_size=g`` or nothing."""
    lay = make_layout(k, d)
    state = train.create_train_state(MODEL, tx, lay, SHAPE, 0)
    step = train.make_train_step(
        MODEL, tx, optax.constant_schedule(0.1), lay, per_worker_batch_size=N, accumulation_steps=accumulation_steps,
        **group,
    )  # fmt: skip
    losses = []
    for images, labels in data:
        b = train.global_batch(lay, {"image": images, "label": labels})
        state, metrics = step(state, b["image"], b["label"])
        jax.block_until_ready(state)  # CPU collective hazard: never two steps in flight
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def one_step():
    return batches(1, seed=1)


@pytest.fixture(scope="module")
def reference_fn():
    """(g, images, labels) -> (loss, gradient, per-group new batch_stats): one plain BatchNorm batch per
    group of g·n examples, summed losses / kn, on one device (no shard_map, no grouping code)."""
    variables = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)), train=False)

    @jax.jit
    def group_loss(params, x, y):
        logits, new = MODEL.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new["batch_stats"]

    grad_fn = jax.jit(jax.value_and_grad(group_loss, has_aux=True))

    def reference(g, images, labels):
        loss, grads, stats = 0.0, None, []
        for j in range(K // g):
            rows = slice(j * g * N, (j + 1) * g * N)
            (ce, new), grad = grad_fn(variables["params"], images[rows], labels[rows])
            loss, grads = loss + ce, grad if grads is None else jax.tree.map(jnp.add, grads, grad)
            stats.append(new)
        return float(loss) / (K * N), jax.tree.map(lambda t: t / (K * N), grads), stats, variables["params"]

    return reference


@pytest.mark.parametrize("g,d", [(8, 8), (8, 1), (4, 8), (2, 2)])
def test_group_statistics_are_one_batchnorm_over_the_group(one_step, reference_fn, g, d):
    """g = k (synchronised BN) across 8 devices and within one, a group spanning 4 of 8 devices, and two
    groups on each of 2 devices: the loss, the summed gradient and every worker's new running statistics
    are those of one BatchNorm over its group's g·n examples; the stem's by hand in numpy."""
    ((images, labels),) = one_step
    state, (loss,) = run(d, one_step, keep_gradient(), bn_group_size=g)
    want_loss, want_grads, want_stats, params = reference_fn(g, images, labels)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    got, want = flat(state.opt_state), flat(want_grads)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    stem = np.asarray(
        jax.lax.conv_general_dilated(
            images, params["stem_conv"]["kernel"], (1, 1), "SAME", dimension_numbers=resnet._NHWC
        )
    ).reshape(K // g, g * N * 8 * 8, -1)
    for w in range(K):
        worker = jax.tree.map(lambda t, w=w: t[w], state.batch_stats)
        np.testing.assert_allclose(flat(worker), flat(want_stats[w // g]), rtol=1e-5, atol=1e-6)
        group = stem[w // g].astype(np.float64)
        np.testing.assert_allclose(worker["stem_bn"]["mean"], 0.1 * group.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(worker["stem_bn"]["var"], 0.9 + 0.1 * group.var(0), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def three_steps():
    return batches(3, seed=2)


@pytest.fixture(scope="module")
def g2_on_8(three_steps):
    return run(8, three_steps, optax.sgd(0.1, momentum=0.9), bn_group_size=2)


@pytest.mark.parametrize("d,acc", [(4, 1), (2, 1), (1, 1), (1, 2)])
def test_same_run_on_any_layout(three_steps, g2_on_8, d, acc):
    """g = 2: groups spanning 2 devices (8 devices), one group per device (4), two and four per device
    (2, 1), and in 2 microsteps of two groups: the same parameters and running statistics."""
    (want, want_losses), (got, got_losses) = (
        g2_on_8,
        run(d, three_steps, optax.sgd(0.1, momentum=0.9), accumulation_steps=acc, bn_group_size=2),
    )
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    assert np.abs(flat(got.params) - flat(want.params)).max() <= 1e-5
    assert np.abs(flat(got.batch_stats) - flat(want.batch_stats)).max() <= 1e-5


def test_groups_change_the_run_and_share_running_statistics(three_steps, g2_on_8):
    """Not vacuous: the workers of a group hold equal running statistics, other groups and g = 1 differ."""
    per_worker, _ = run(8, three_steps, optax.sgd(0.1, momentum=0.9))
    stats = np.stack([flat(jax.tree.map(lambda t, w=w: t[w], g2_on_8[0].batch_stats)) for w in range(K)])
    assert np.array_equal(stats[0], stats[1]) and np.array_equal(stats[6], stats[7])
    assert np.abs(stats[0] - stats[2]).max() > 1e-3
    assert np.abs(flat(per_worker.params) - flat(g2_on_8[0].params)).max() > 1e-4


def test_group_size_one_is_bitwise_the_per_worker_step(three_steps):
    """g = 1 is Goyal's per-worker BN: bitwise the step built without the argument (4 workers a device)."""
    tx = optax.sgd(0.1, momentum=0.9)
    (a, la), (b, lb) = run(2, three_steps, tx), run(2, three_steps, tx, bn_group_size=1)
    assert la == lb
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _config(**overrides):
    """The base config with ``overrides``, without ConfigDict's type lock (as a user's file may give)."""
    return ml_collections.ConfigDict({**schema.base_config().to_dict(), **overrides}, type_safe=False)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"bn_group_size": 3}, r"config.bn_group_size=3 must divide config.num_workers=8 .*use one of 1, 2, 4, 8$"),
        ({"bn_group_size": 0}, r"config.bn_group_size=0 must be a positive number"),
        ({"bn_group_size": -2}, r"config.bn_group_size=-2 must be a positive number"),
        ({"bn_group_size": 2.0}, r"config.bn_group_size=2.0 must be a positive number"),
        ({"bn_group_size": 2, "strategy": "dpsgd"}, r"strategy 'dpsgd' has not; use strategy 'allreduce' or "),
        ({"bn_group_size": 2, "strategy": "async_ps"}, r"strategy 'async_ps' has not; use strategy 'allreduce'"),
        ({"bn_group_size": 2, "noise_scale": True}, r"config.noise_scale=True needs each worker's own gradient"),
    ],
)
def test_bad_group_sizes_are_one_line(overrides, message):
    with pytest.raises(errors.ConfigError, match=message) as e:
        validate.check_config(_config(**overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides,devices,message",
    [
        (
            {"num_workers": 12, "bn_group_size": 4},
            2,
            r"bn_group_size=4 must divide, or be a multiple of, the 6 workers",
        ),
        ({"bn_group_size": 2, "accumulation_steps": 8}, 1, r"accumulation_steps=8 must divide the 4 BN groups per"),
        ({"bn_group_size": 4, "accumulation_steps": 2}, 4, r"accumulation_steps=2 must divide the 1 BN groups per"),
    ],
)
def test_group_layouts_that_cannot_hold_whole_groups_are_one_line(overrides, devices, message):
    config = _config(num_devices=devices, **overrides)
    validate.check_config(config)
    with pytest.raises(errors.ConfigError, match=message) as e:
        validate.check_layout(config, 8)
    assert "\n" not in str(e.value)


def test_only_shared_parameter_strategies_accept_groups():
    accepting = sorted(name for name, e in strategies.REGISTRY.items() if e.cls.supports_bn_groups)
    assert accepting == ["allreduce"]
    with pytest.raises(ValueError, match="one shared copy"):
        train.make_train_step(
            MODEL, optax.sgd(0.1), optax.constant_schedule(0.1), make_layout(K, 8),
            per_worker_batch_size=N, strategy=strategies.from_config(_config(strategy="dpsgd"), 8), bn_group_size=2,
        )  # fmt: skip


def test_two_processes_with_a_group_across_the_process_boundary(tmp_path_factory, data_dir):
    """k = 6 workers on 2 processes x 3 devices, g = 2: the group of workers 2 and 3 spans devices 2 and 3
    of processes 0 and 1. The same run as 6 workers on one device of one process (three groups there)."""
    steps, ref_dir, mp_dir = 4, tmp_path_factory.mktemp("bn_ref"), tmp_path_factory.mktemp("bn_mp")
    common = {"max_steps": steps, "checkpoint_every_steps": steps, "num_workers": 6, "bn_group_size": 2}
    train.train_and_evaluate(tiny_config(data_dir, num_devices=1, **common), str(ref_dir))
    args = [f"--config.{key}={value}" for key, value in common.items()]
    procs = _two_processes(
        [*TINY_ARGS, f"--workdir={mp_dir}", f"--config.data_dir={data_dir}", "--config.num_epochs=1", *args], 3
    )
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    (want, want_state), (got, got_state) = _summary(ref_dir), _summary(mp_dir)
    assert got["processes"] == 2 and got["devices"] == 6 and want["devices"] == 1
    for field in ("train_loss", "eval_loss", "eval_accuracy"):
        assert got[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
    assert np.abs(got_state - want_state).max() <= 1e-5


def test_the_command_line_refuses_in_one_line(tmp_path):
    done = fork_runner().run("--config=experiments/digits.py", f"--workdir={tmp_path}", "--config.bn_group_size=3")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("lbsgd: error: config.bn_group_size=3 must divide") and len(lines) == 1, done.stderr
