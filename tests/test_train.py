"""The train step against independent references: Remark 3, per-worker BN, invariance to devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from lbsgd import optim, strategies, train
from lbsgd.config import schema
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


def run_steps(
    model, tx, d, images_list, labels_list, accumulation_steps=1, seed=0, aggregation="psum", k=K, label_smoothing=0.0
):
    lay = layout_lib.make_layout(k, d)
    state = train.create_train_state(model, tx, lay, images_list[0].shape[1:], seed)
    step = train.make_train_step(
        model,
        tx,
        optax.constant_schedule(0.1),
        lay,
        per_worker_batch_size=N,
        accumulation_steps=accumulation_steps,
        strategy=strategies.Allreduce(aggregation=aggregation),
        label_smoothing=label_smoothing,
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


def _separate_worker_gradients(model, variables, images, labels, k=K, n=N):
    """Σ_w ∇(Σ_{i in w} ℓ_i / kn), one worker at a time on the host, each with BN over its own n examples."""

    def worker_loss(p, x, y):
        logits, _ = model.apply(
            {"params": p, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)) / (k * n)

    grad = jax.jit(jax.grad(worker_loss))
    total = None
    for w in range(k):
        g = grad(variables["params"], images[w * n : (w + 1) * n], labels[w * n : (w + 1) * n])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    big = grad(variables["params"], images, labels)  # one BN batch of kn
    return total, big


def test_goyal_sgd_step_decays_once_on_the_sum_of_worker_gradients():
    """One allreduce step with goyal_sgd (k = 8 workers on 4 devices, per-worker BN) is, by hand,

        w1 = w0 − η (Σ_w ∇ℓ_w + λ w0 · mask)       (zero velocity at step 0, no Nesterov)

    with Σ_w ∇ℓ_w computed one worker at a time on the host and the decay mask written out by hand
    (kernels decay; BN γ/β and the dense bias do not). Weight decay is applied once to the combined
    gradient (Remark 1), not once per worker: the k·λ alternative is checked to be far off.
    """
    model = TinyBNNet()
    eta, lam = 0.1, 0.05
    tx = optim.goyal_sgd(eta, momentum=0.9, nesterov=False, weight_decay=lam)
    images, labels = batch(2)
    state, _ = run_steps(model, tx, 4, [images], [labels])
    init = jax.device_get(train.create_train_state(model, tx, layout_lib.make_layout(K, 4), (8, 8, 1), 0))
    variables = {"params": init.params, "batch_stats": jax.tree.map(lambda t: t[0], init.batch_stats)}
    grads, big = _separate_worker_gradients(model, variables, images, labels)
    decayed = {("stem_conv", "kernel"), ("Dense_0", "kernel")}
    w0 = {(a, b): np.asarray(v, np.float64) for a, leaf in variables["params"].items() for b, v in leaf.items()}
    g = {(a, b): np.asarray(v, np.float64) for a, leaf in grads.items() for b, v in leaf.items()}
    got = {(a, b): np.asarray(v, np.float64) - w0[a, b] for a, leaf in state.params.items() for b, v in leaf.items()}
    assert set(got) == set(w0) == {*decayed, ("stem_bn", "scale"), ("stem_bn", "bias"), ("Dense_0", "bias")}

    def update(times):
        return {key: -eta * (g[key] + (times * lam * w0[key] if key in decayed else 0.0)) for key in w0}

    def rel(a, b):
        flat = lambda t: np.concatenate([t[key].ravel() for key in sorted(w0)])  # noqa: E731
        return np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b))

    assert rel(got, update(1)) < 1e-5
    assert rel(got, update(K)) > 0.1  # decay added once per worker: far off
    assert rel(got, update(0)) > 0.01  # and the decay term is really there
    # Per-worker BN matters: one BN batch of kn gives a different gradient (workers are not ghosts of each other).
    gb = jax.flatten_util.ravel_pytree(big)[0]
    gw = jax.flatten_util.ravel_pytree(grads)[0]
    assert np.linalg.norm(gb - gw) / np.linalg.norm(gw) > 1e-3


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


def _np_cross_entropy(logits, labels, eps=0.0):
    """−Σ_c q_c log softmax(z)_c with q = (1 − ε)·onehot + ε/C, in float64 numpy."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    num_classes = z.shape[-1]
    q = (1.0 - eps) * np.eye(num_classes)[np.asarray(labels)] + eps / num_classes
    return -(q * log_softmax).sum(axis=-1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_cross_entropy_label_smoothing_by_hand(eps):
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=(16, 10)).astype(np.float32)
    logits[0] = [60.0, -60.0] + [0.0] * 8  # large logits: must stay finite and exact
    labels = rng.integers(0, 10, size=16)
    labels[0] = 1  # the confidently wrong row: loss ≈ 120 (1 − ε + ε/10) + ...
    got = np.asarray(train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps))
    want = _np_cross_entropy(logits, labels, eps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # independent closed form for row 0: log-sum-exp ≈ 60, so −log p_c ≈ 60 − z_c
    nll = 60.0 - logits[0].astype(np.float64)
    assert got[0] == pytest.approx((1 - eps) * nll[1] + eps * nll.mean(), rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_metrics_are_exact_over_kn_examples(eps):
    """The step's reported loss is the mean (label-smoothed) cross-entropy over all kn examples, by numpy."""
    model = TinyNet()
    images, labels = batch(3)
    _, losses = run_steps(model, keep_gradient(), 4, [images], [labels], label_smoothing=eps)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    want = float(np.mean(_np_cross_entropy(model.apply({"params": params}, images), labels, eps)))
    assert abs(losses[0] - want) < 1e-6 * max(1.0, abs(want))
    if eps:
        assert abs(want - float(np.mean(_np_cross_entropy(model.apply({"params": params}, images), labels)))) > 1e-3


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


class LogitsNet(nn.Module):
    """logits = x + b: the eval step sees exactly the logits a test chooses (x), shifted by a parameter."""

    @nn.compact
    def __call__(self, x, train=False):
        return x + self.param("bias", nn.initializers.zeros, (x.shape[-1],))


def _np_eval_sums(logits, labels, mask):
    """[Σ ce, Σ top-1 correct, Σ top-5 correct, Σ mask] counted by hand with numpy argsort."""
    order = np.argsort(-np.asarray(logits, np.float64), axis=-1)  # classes by decreasing logit (no ties)
    top1 = order[:, 0] == labels
    top5 = np.any(order[:, :5] == labels[:, None], axis=-1)
    return np.array(
        [np.sum(_np_cross_entropy(logits, labels) * mask), np.sum(top1 * mask), np.sum(top5 * mask), np.sum(mask)]
    )


def _eval_batch(lay, images, labels, mask):
    b = train.global_batch(lay, {"image": images, "label": labels, "mask": mask})
    return b["image"], b["label"], b["mask"]


def test_eval_top1_top5_loss_and_mask_by_hand():
    """make_eval_step's sums on 10-class logits against a numpy argsort count; padding rows excluded.

    Every real row's label is the class of a chosen rank (0 .. 9) in that row's logits, so top-1 and
    top-5 differ (1 vs 5 of every 10 ranks); the padding rows (mask 0) have large logits and as label
    their most or their least likely class, so counting them would change every sum.
    """
    k, d, rows, pad, classes = 8, 4, 40, 7, 10
    real = rows - pad
    rng = np.random.default_rng(11)
    bias = rng.normal(size=classes).astype(np.float32)
    images = rng.normal(scale=2.0, size=(rows, classes)).astype(np.float32)
    images[real:] *= 50.0  # padding rows: confident (large logits)...
    logits = images.astype(np.float64) + bias  # what the model computes
    ranks = rng.permutation(np.arange(real) % classes)
    order = np.argsort(-logits, axis=-1)
    labels = np.empty(rows, np.int32)
    labels[:real] = order[np.arange(real), ranks]
    labels[real:] = np.where(np.arange(pad) % 2, order[real:, 0], order[real:, -1])  # ...right, or very wrong
    mask = np.r_[np.ones(real), np.zeros(pad)].astype(np.float32)
    perm = rng.permutation(rows)  # padding rows spread over devices
    images, labels, mask, logits = images[perm], labels[perm], mask[perm], logits[perm]

    model = LogitsNet()
    lay = layout_lib.make_layout(k, d)
    state = train.create_train_state(model, optax.sgd(0.1), lay, (classes,), 0)
    state = state.replace(params={"bias": jnp.asarray(bias)})
    got = np.asarray(train.make_eval_step(model, lay)(state, *_eval_batch(lay, images, labels, mask)), np.float64)
    want = _np_eval_sums(logits, labels, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the hand count is the one the labels were built for: rank 0 is top-1, ranks 0..4 are top-5
    top1_rows, top5_rows = int((ranks == 0).sum()), int((ranks < 5).sum())
    assert want[3] == real and (want[1], want[2]) == (top1_rows, top5_rows) and top1_rows < top5_rows < real
    # counting the padding rows would change every sum
    unmasked = _np_eval_sums(logits, labels, np.ones(rows))
    assert np.all(unmasked > want) and unmasked[0] > 2 * want[0]


def _np_bn_net(params, stats, images):
    """TinyBNNet in eval mode, by hand: 3x3 SAME conv (no bias) -> BN(running stats, ε = 1e-5) -> ReLU ->
    spatial mean -> dense."""
    x = np.asarray(images, np.float64)
    kernel = np.asarray(params["stem_conv"]["kernel"], np.float64)  # [3, 3, in, out]
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(xp[:, i : i + h, j : j + w, :] @ kernel[i, j] for i in range(3) for j in range(3))
    bn = params["stem_bn"]
    y = (y - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    y = np.maximum(y, 0.0).mean(axis=(1, 2))
    return y @ np.asarray(params["Dense_0"]["kernel"], np.float64) + np.asarray(params["Dense_0"]["bias"])


def test_eval_uses_the_mean_of_the_workers_bn_statistics():
    """k = 8 workers with different BN running statistics (set by hand): the eval step's sums equal a numpy
    forward pass with the workers' arithmetic means, mean = Σ_w mean_w / k and var = Σ_w var_w / k, and
    differ from those of one worker's statistics."""
    k, d, rows = 8, 4, 24
    rng = np.random.default_rng(12)
    model = TinyBNNet()
    lay = layout_lib.make_layout(k, d)
    state = train.create_train_state(model, optax.sgd(0.1), lay, (8, 8, 1), 0)
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    params["stem_bn"] = {"scale": rng.uniform(0.5, 2.0, 6), "bias": rng.normal(size=6)}  # not the init 1 / 0
    params["Dense_0"]["bias"] = rng.normal(scale=0.3, size=10)
    params = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), params)
    worker_stats = {
        "mean": rng.normal(scale=0.5, size=(k, 6)).astype(np.float32),
        "var": rng.uniform(0.2, 3.0, size=(k, 6)).astype(np.float32),
    }
    sharded = jax.tree.map(lambda t: jax.device_put(t, lay.sharding(P(layout_lib.AXIS))), worker_stats)
    state = state.replace(params=params, batch_stats={"stem_bn": sharded})
    images = rng.normal(size=(rows, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=rows).astype(np.int32)
    mask = (rng.uniform(size=rows) < 0.8).astype(np.float32)
    got = np.asarray(train.make_eval_step(model, lay)(state, *_eval_batch(lay, images, labels, mask)), np.float64)

    mean_stats = {name: np.asarray(v, np.float64).mean(axis=0) for name, v in worker_stats.items()}
    logits = _np_bn_net(params, mean_stats, images)
    want = _np_eval_sums(logits, labels, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The statistics matter at this tolerance: worker 0's alone give a clearly different loss.
    one = _np_bn_net(params, {name: np.asarray(v[0], np.float64) for name, v in worker_stats.items()}, images)
    assert abs(_np_eval_sums(one, labels, mask)[0] - want[0]) > 1e-2 * want[0]


def _host_state(model, tx, lay, image_shape, seed):
    """A TrainState placed like create_train_state's, with He-normal kernels drawn by numpy (γ = 1, β = 0).

    Drawing the initial values on the host skips compiling the model's jax.random initialisers, which
    costs more on CPU than the train step itself; every layer (zero-γ blocks included) then gets gradient.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
    fill = {"scale": np.ones, "var": np.ones, "bias": np.zeros, "mean": np.zeros}

    def draw(path, leaf):
        name = path[-1].key
        if name in fill:
            return fill[name](leaf.shape, np.float32)
        return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    k = lay.num_workers
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=jax.tree.map(lambda x: np.broadcast_to(x, (k, *x.shape)), variables["batch_stats"]),
        opt_state=tx.init(variables["params"]),
        extra={},
    )
    return jax.device_put(state, jax.tree.map(lay.sharding, train.state_specs(state)))


def test_bfloat16_train_steps_close_to_float32():
    """config.dtype = 'bfloat16' (through build_model): three goyal_sgd steps (k = 8 x n = 4 on 2 devices)
    from the same state and batches stay finite, keep float32 parameters, and move them by nearly the
    float32 run's amount.

    The model is build_model's resnet4 (width 8: the stem, one basic block and the classifier): the
    layers and dtype handling of every ResNet, a third of ResNet-8's compile time.

    Tolerance: relative L2 difference of the total parameter change (w3 − w0) < 5 %. bfloat16 keeps 8
    significand bits (relative rounding 2^-9 ≈ 0.2 % per operation); forward and backward passes through
    conv/BN layers with n = 4 examples per BN batch compound that into update errors of about 1 %
    (measured here: 1.2 %). A broken bf16 path (wrong or dropped gradients) is off by ~100 %. The
    difference must also be non-zero, or the model did not compute in bfloat16.
    """
    rng = np.random.default_rng(13)
    data = [
        (rng.normal(size=(K * N, 8, 8, 3)).astype(np.float32), rng.integers(0, 10, size=K * N).astype(np.int32))
        for _ in range(3)
    ]
    tx = optim.goyal_sgd(0.1)  # Nesterov, m = 0.9, λ = 1e-4: the paper's optimizer
    lay = layout_lib.make_layout(K, 2)
    moved = {}
    for dtype in ("float32", "bfloat16"):
        config = schema.base_config()
        config.model, config.model_width, config.dtype = "resnet4", 8, dtype
        model = train.build_model(config, 10)
        assert model.dtype == getattr(jnp, dtype) and model.width == 8 and tuple(model.stage_sizes) == (1,)
        state = _host_state(model, tx, lay, (8, 8, 3), seed=0)
        w0 = np.asarray(jax.flatten_util.ravel_pytree(jax.device_get(state.params))[0], np.float64)
        step = train.make_train_step(model, tx, optax.constant_schedule(0.1), lay, per_worker_batch_size=N)
        for images, labels in data:
            b = train.global_batch(lay, {"image": images, "label": labels})
            state, metrics = step(state, b["image"], b["label"])
            jax.block_until_ready(state)
            assert np.isfinite(float(metrics["loss"]))
        flat = jax.flatten_util.ravel_pytree(jax.device_get(state.params))[0]
        assert flat.dtype == np.float32 and np.all(np.isfinite(flat))
        moved[dtype] = np.asarray(flat, np.float64) - w0
    rel = np.linalg.norm(moved["bfloat16"] - moved["float32"]) / np.linalg.norm(moved["float32"])
    assert 0.0 < rel < 0.05, rel


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


def test_train_step_compiles_once_across_logging_evaluation_checkpoints_and_resume(data_dir, tmp_path, monkeypatch):
    """No waste: one executable per shape for the whole loop (steps, an evaluation in the middle, saves)
    and again after a resume; the eval step compiles once per evaluation model."""
    made = []

    def recording(make):
        def wrapper(*args, **kwargs):
            fn = make(*args, **kwargs)
            made.append(fn)
            return fn

        return wrapper

    from lbsgd.trainer import build

    monkeypatch.setattr(build, "make_train_step", recording(train.make_train_step))
    monkeypatch.setattr(build, "make_eval_step", recording(train.make_eval_step))
    config = tiny_config(
        data_dir, per_worker_batch_size=64, num_epochs=10, max_steps=5, checkpoint_every_steps=2, log_every_steps=1,
        eval_every_epochs=1,
    )
    train.train_and_evaluate(config, str(tmp_path))  # kn = 512: 2 steps an epoch, evaluations after steps 2, 4, 5
    config.max_steps = 8
    train.train_and_evaluate(config, str(tmp_path))  # resumed at step 5: restored arrays, same shapes
    train_steps, eval_steps = made[0::2], made[1::2]
    assert [f._cache_size() for f in train_steps] == [1, 1]
    assert [f._cache_size() for f in eval_steps] == [1, 1]


def test_init_program_at_cpu_level_1_gives_bitwise_the_default_compile_s_state(monkeypatch):
    """create_train_state compiles its one-off program with INIT_CPU_COMPILER_OPTIONS (faster to compile);
    the parameters, BN statistics and optimizer state must be bitwise those of XLA's default options."""
    from lbsgd.models import resnet

    model, image_shape = resnet.create_model("resnet4", num_classes=10, width=8), (8, 8, 1)
    tx = optim.goyal_sgd(0.1, momentum=0.9, weight_decay=1e-4)
    lay = layout_lib.make_layout(K, 2)
    got = train.create_train_state(model, tx, lay, image_shape, seed=5)
    assert train.init_compiler_options("cpu") == train.INIT_CPU_COMPILER_OPTIONS != {}
    from lbsgd.trainer import state as state_lib

    monkeypatch.setattr(state_lib, "init_compiler_options", lambda platform: {})  # XLA's defaults
    want = train.create_train_state(model, tx, lay, image_shape, seed=5)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves) > 10
    for a, b in zip(got_leaves, want_leaves):
        assert np.array_equal(np.asarray(a), np.asarray(b))
