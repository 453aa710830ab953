"""The train step against independent references: Remark 3, per-worker BN, invariance to devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lbsgd import strategies, train
from lbsgd.parallel import layout as layout_lib

K, N = 8, 4


class TinyNet(nn.Module):
    """No BatchNorm: the gradient does not depend on how examples are grouped into workers."""

    @nn.compact
    def __call__(self, x, train=True):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.tanh(nn.Dense(16)(x)))


class TinyBNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> Dense: the smallest net where per-worker BN statistics matter."""

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(6, (3, 3), use_bias=False, name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def keep_gradient():
    """An optax 'optimizer' that leaves params alone and stores the (aggregated) gradient as its state."""
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p), update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )


def batch(seed=0, k=K, n=N):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(k * n, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=(k * n,)).astype(np.int32)
    return images, labels


def run_steps(model, tx, d, images_list, labels_list, accumulation_steps=1, seed=0, aggregation="psum", k=K):
    lay = layout_lib.make_layout(k, d)
    state = train.create_train_state(model, tx, lay, (8, 8, 1), seed)
    step = train.make_train_step(
        model,
        tx,
        optax.constant_schedule(0.1),
        lay,
        per_worker_batch_size=N,
        accumulation_steps=accumulation_steps,
        strategy=strategies.Allreduce(aggregation=aggregation),
    )
    losses = []
    for images, labels in zip(images_list, labels_list):
        b = train.global_batch(lay, {"image": images, "label": labels})
        state, metrics = step(state, b["image"], b["label"])
        jax.block_until_ready(state)  # CPU collective hazard: never two steps in flight
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


@pytest.mark.parametrize("d", [8, 2, 1])
def test_remark3_psum_gradient_equals_gradient_of_mean_loss(d):
    """Remark 3: Σ_workers ∇(Σ_worker ℓ / kn) equals ∇ of the mean loss over all kn examples."""
    model = TinyNet()
    images, labels = batch()
    state, _ = run_steps(model, keep_gradient(), d, [images], [labels])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    ref = jax.grad(
        lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, images), labels))
    )(params)
    got, want = jax.flatten_util.ravel_pytree(state.opt_state)[0], jax.flatten_util.ravel_pytree(ref)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def _stem_output(params, images):
    """The stem convolution computed by hand with lax (independent of the Flax module)."""
    kernel = params["stem_conv"]["kernel"]
    return jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("d", [8, 2, 1])
def test_per_worker_batchnorm_statistics(d):
    """Each worker's BN batch statistics are mean/var over exactly its n examples (never synced)."""
    model = TinyBNNet()
    images, labels = batch(1)
    lay = layout_lib.make_layout(K, d)
    state0 = jax.device_get(train.create_train_state(model, keep_gradient(), lay, (8, 8, 1), 0))
    state, _ = run_steps(model, keep_gradient(), d, [images], [labels])
    stem = np.asarray(_stem_output(state0.params, images)).reshape(K, N, 8, 8, -1)
    run_mean = np.asarray(state.batch_stats["stem_bn"]["mean"])  # [k, C]
    run_var = np.asarray(state.batch_stats["stem_bn"]["var"])
    for w in range(K):
        mean_w = stem[w].mean(axis=(0, 1, 2))
        var_w = stem[w].var(axis=(0, 1, 2))
        # Flax running average with momentum 0.9 from the initial (mean 0, var 1).
        np.testing.assert_allclose(run_mean[w], 0.1 * mean_w, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(run_var[w], 0.9 + 0.1 * var_w, rtol=1e-4, atol=1e-6)
    assert np.abs(run_mean[0] - run_mean[1]).max() > 1e-3  # different workers, different statistics


def test_bn_gradient_equals_sum_of_separate_worker_gradients():
    """With per-worker BN, the combined gradient equals Σ_w ∇ℓ_w computed one worker at a time on the host."""
    model = TinyBNNet()
    images, labels = batch(2)
    state, _ = run_steps(model, keep_gradient(), 4, [images], [labels])
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)

    def worker_loss(p, x, y):
        logits, _ = model.apply(
            {"params": p, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)) / (K * N)

    ref = None
    for w in range(K):
        g = jax.grad(worker_loss)(variables["params"], images[w * N : (w + 1) * N], labels[w * N : (w + 1) * N])
        ref = g if ref is None else jax.tree.map(jnp.add, ref, g)
    got, want = jax.flatten_util.ravel_pytree(state.opt_state)[0], jax.flatten_util.ravel_pytree(ref)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    # ...and differs from the gradient of one big BN batch of kn (workers are not ghosts of each other).
    big = jax.grad(lambda p: worker_loss(p, images, labels))(variables["params"])
    assert np.linalg.norm(jax.flatten_util.ravel_pytree(big)[0] - want) / np.linalg.norm(want) > 1e-3


def test_same_result_on_any_device_count_and_with_accumulation():
    """Same (k, n, seed) => same training run on 8, 4, 2, 1 devices and with gradient accumulation."""
    model = TinyBNNet()
    tx = optax.sgd(0.1, momentum=0.9)
    data = [batch(s) for s in range(3)]
    imgs, lbls = [b[0] for b in data], [b[1] for b in data]
    ref, ref_losses = run_steps(model, tx, 8, imgs, lbls)
    ref_flat = jax.flatten_util.ravel_pytree((ref.params, ref.batch_stats))[0]
    for d, acc in [(4, 1), (2, 1), (1, 1), (1, 4), (2, 2)]:
        got, losses = run_steps(model, tx, d, imgs, lbls, accumulation_steps=acc)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        diff = np.abs(jax.flatten_util.ravel_pytree((got.params, got.batch_stats))[0] - ref_flat).max()
        assert diff <= 1e-5, (d, acc, diff)


def test_metrics_are_exact_over_kn_examples():
    """Reported loss/accuracy equal the mean over all kn examples of the per-worker-BN forward pass."""
    model = TinyNet()
    images, labels = batch(3)
    _, losses = run_steps(model, keep_gradient(), 4, [images], [labels])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    want = float(
        jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, images), labels))
    )
    assert abs(losses[0] - want) < 1e-6 * max(1.0, abs(want))


@pytest.mark.parametrize("k,d", [(8, 8), (6, 6), (6, 3)])
def test_ring_and_halving_doubling_train_like_psum(k, d):
    """§4 aggregators are interchangeable: 20 training steps give the psum run's losses within 1e-5."""
    model = TinyBNNet()
    tx = optax.sgd(0.1, momentum=0.9)
    data = [batch(s, k=k) for s in range(20)]
    imgs, lbls = [b[0] for b in data], [b[1] for b in data]
    ref, ref_losses = run_steps(model, tx, d, imgs, lbls, k=k)
    for method in ("ring", "halving_doubling"):
        got, losses = run_steps(model, tx, d, imgs, lbls, aggregation=method, k=k)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        diff = np.abs(jax.flatten_util.ravel_pytree(got.params)[0] - jax.flatten_util.ravel_pytree(ref.params)[0]).max()
        assert diff <= 1e-5, (method, diff)


@pytest.mark.parametrize(
    "m,n,acc,limit,want",
    [
        (8, 4, 2, 0, 2),  # given explicitly
        (8, 4, 0, 0, 1),  # automatic, no limit
        (8, 4, 0, 32, 1),  # 8 workers x 4 fit
        (8, 4, 0, 16, 2),  # 4 workers x 4 per microstep
        (8, 4, 0, 5, 8),  # one worker per microstep
        (6, 4, 0, 9, 3),  # 2 workers of 4 per microstep; 4 does not divide 6
        (8, 4, 0, 3, 8),  # even one worker is too big: the least memory possible
    ],
)
def test_resolve_accumulation(m, n, acc, limit, want):
    assert train.resolve_accumulation(m, n, acc, limit) == want
