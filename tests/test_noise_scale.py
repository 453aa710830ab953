"""The gradient noise scale (issue #11): McCandlish et al.'s estimators against closed-form values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_bn_net
from lbsgd import noise_scale, strategies, train
from lbsgd.parallel import layout as layout_lib


def test_estimators_invert_the_expected_squared_norms():
    """E|G_B|² = |G|² + tr(Σ)/B: fed exact expectations, the two estimators return |G|² and tr(Σ)."""
    g2, trace = 0.37, 12.5
    for b_small, b_big in [(4, 32), (16, 128), (1, 2)]:
        got = noise_scale.estimates(g2 + trace / b_small, g2 + trace / b_big, b_small, b_big)
        assert np.allclose(got, (g2, trace), rtol=1e-12)
    with pytest.raises(ValueError, match="B_small < B_big"):
        noise_scale.estimates(1.0, 1.0, 8, 8)


def test_moving_average_is_bias_corrected():
    """After one update the read-out is that step's estimate exactly (not (1 − decay) of it); after
    many equal steps too; the run average is the ratio of the sums."""
    state = noise_scale.init()
    state = noise_scale.update(state, 2.0 + 10.0 / 4, 2.0 + 10.0 / 32, 4, 32, decay=0.9)
    out = jax.device_get(noise_scale.read(state))
    assert out["noise_g2"] == pytest.approx(2.0, rel=1e-5) and out["noise_trace"] == pytest.approx(10.0, rel=1e-5)
    assert out["noise_scale"] == pytest.approx(5.0, rel=1e-5) and out["noise_scale_run"] == pytest.approx(5.0, rel=1e-5)
    state = noise_scale.update(state, 1.0 + 30.0 / 4, 1.0 + 30.0 / 32, 4, 32, decay=0.9)  # |G|² 1, tr 30
    out = jax.device_get(noise_scale.read(state))
    want_g2 = (0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (0.9 * 0.1 + 0.1)  # weights 0.09 and 0.1
    assert out["noise_g2"] == pytest.approx(want_g2, rel=1e-5)
    assert out["noise_scale_run"] == pytest.approx(40.0 / 3.0, rel=1e-5)  # (10 + 30) / (2 + 1)
    assert np.isnan(jax.device_get(noise_scale.read(noise_scale.init()))["noise_scale"])


class Linear(nn.Module):
    """Softmax regression: one example's gradient is x ⊗ (p − y) and p − y, in closed form."""

    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(3)(x)


def _population(seed=0, size=512, dim=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, dim)).astype(np.float32)
    labels = np.argmax(x @ rng.normal(size=(dim, 3)) + rng.normal(size=(size, 3)), axis=1).astype(np.int32)
    return x, labels


def _per_example_gradients(params, x, labels):
    """Each example's gradient of its cross-entropy [N, P] (kernel then bias), closed form in float64."""
    w, b = np.asarray(params["Dense_0"]["kernel"], np.float64), np.asarray(params["Dense_0"]["bias"], np.float64)
    logits = x.astype(np.float64) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(3)[labels]  # dℓ/dlogits
    return np.concatenate([(x[:, :, None] * r[:, None, :]).reshape(len(x), -1), r], axis=1)


def _closed_form_noise(params, x, labels):
    """|G|², tr(Σ) of one example's gradient over the population, from the closed form in numpy."""
    per_example = _per_example_gradients(params, x, labels)
    g = per_example.mean(0)
    return float(g @ g), float(((per_example - g) ** 2).sum(1).mean())


def test_train_step_recovers_the_closed_form_noise_scale():
    """Frozen parameters, batches drawn with replacement from a population whose one-example gradients
    are known in closed form: after 600 steps the estimates are within 10 % of |G|², tr(Σ) and
    B_simple = tr(Σ)/|G|² (k = 8 workers x n = 4 on 2 devices)."""
    k, n, steps = 8, 4, 600
    x, labels = _population()
    model, lay = Linear(), layout_lib.make_layout(k, 2)
    tx = optax.set_to_zero()  # the parameters stay where the closed form is evaluated
    state = train.create_train_state(model, tx, lay, x.shape[1:], seed=0, noise_scale=True)
    step = train.make_train_step(
        model, tx, optax.constant_schedule(0.0), lay, per_worker_batch_size=n, noise_scale=True, noise_scale_decay=0.995
    )
    g2, trace = _closed_form_noise(jax.device_get(state.params), x, labels)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        idx = rng.integers(0, len(x), size=k * n)
        b = train.global_batch(lay, {"image": x[idx], "label": labels[idx]})
        state, metrics = step(state, b["image"], b["label"])
        jax.block_until_ready(state)
    # The bias-corrected averages read by hand from the raw state (not through noise_scale.read).
    raw = {key: float(v) for key, v in jax.device_get(state.noise).items()}
    assert raw["weight"] == pytest.approx(1 - 0.995**steps, rel=1e-4)  # Σ_t (1 − decay) decay^t
    out = {"noise_g2": raw["g2"] / raw["weight"], "noise_trace": raw["trace"] / raw["weight"],
           "noise_scale": raw["trace"] / raw["g2"], "noise_scale_run": raw["sum_trace"] / raw["sum_g2"]}
    assert 4 < trace / g2 < 1000, (g2, trace)  # above B_small: measurable
    assert out["noise_scale_run"] == pytest.approx(trace / g2, rel=0.10)
    assert out["noise_scale"] == pytest.approx(trace / g2, rel=0.10)  # the moving average (≈ last 200 steps)
    assert out["noise_g2"] == pytest.approx(g2, rel=0.10) and out["noise_trace"] == pytest.approx(trace, rel=0.10)
    for key, value in out.items():  # the last step's logged metrics are that state's read-out
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5), key


def test_one_train_step_logs_the_estimates_exactly():
    """One step from the initial state, k = 8 workers x n = 4 on 2 devices: the logged |G|² and tr(Σ) and the
    stored state equal McCandlish et al.'s estimators computed in numpy from the closed-form per-example
    gradients at the step's parameters, with B_small = n (each worker's mean gradient) and B_big = kn."""
    k, n, decay = 8, 4, 0.9
    x, labels = _population(seed=3, size=k * n)
    model, lay = Linear(), layout_lib.make_layout(k, 2)
    tx = optax.sgd(0.5)
    state = train.create_train_state(model, tx, lay, x.shape[1:], seed=0, noise_scale=True)
    params = jax.device_get(state.params)
    step = train.make_train_step(model, tx, optax.constant_schedule(0.5), lay, per_worker_batch_size=n,
                                 noise_scale=True, noise_scale_decay=decay)
    b = train.global_batch(lay, {"image": x, "label": labels})
    state, metrics = step(state, b["image"], b["label"])
    noise, metrics = jax.device_get((state.noise, metrics))

    per_example = _per_example_gradients(params, x, labels)  # worker w holds rows w·n … w·n + n − 1
    small = per_example.reshape(k, n, -1).mean(1)  # G_small of each worker, over its n examples
    small_sq = np.mean(np.sum(small**2, axis=1))  # averaged over the k workers
    big_sq = np.sum(per_example.mean(0) ** 2)  # |G_big|², over all kn
    b_small, b_big = n, k * n
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    assert g2 > 0 and trace > 0

    assert float(metrics["noise_g2"]) == pytest.approx(g2, rel=1e-5)
    assert float(metrics["noise_trace"]) == pytest.approx(trace, rel=1e-5)
    assert float(metrics["noise_scale"]) == pytest.approx(trace / g2, rel=1e-5)
    assert float(metrics["noise_scale_run"]) == pytest.approx(trace / g2, rel=1e-5)
    # The state after one update from zeros: the moving averages carry (1 − decay) of the estimates.
    assert float(noise["weight"]) == pytest.approx(1 - decay, rel=1e-6)
    assert float(noise["g2"]) == pytest.approx((1 - decay) * g2, rel=1e-5)
    assert float(noise["trace"]) == pytest.approx((1 - decay) * trace, rel=1e-5)
    assert float(noise["sum_g2"]) == pytest.approx(g2, rel=1e-5)
    assert float(noise["sum_trace"]) == pytest.approx(trace, rel=1e-5)


def _three_steps(d, noise, accumulation_steps=1, k=8, n=4):
    model, tx = tiny_bn_net(), optax.sgd(0.1, momentum=0.9)
    lay = layout_lib.make_layout(k, d)
    rng = np.random.default_rng(0)
    state = train.create_train_state(model, tx, lay, (8, 8, 1), seed=0, noise_scale=noise)
    step = train.make_train_step(
        model, tx, optax.constant_schedule(0.1), lay, per_worker_batch_size=n, noise_scale=noise,
        accumulation_steps=accumulation_steps,
    )
    metrics = None
    for _ in range(3):
        b = train.global_batch(lay, {"image": rng.normal(size=(k * n, 8, 8, 1)).astype(np.float32),
                                     "label": rng.integers(0, 10, k * n).astype(np.int32)})
        state, metrics = step(state, b["image"], b["label"])
        jax.block_until_ready(state)
    return jax.device_get(state), jax.device_get(metrics)


def _flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def test_estimate_only_observes_and_is_the_same_on_any_layout():
    """With the estimate on, the parameters, BN statistics and optimizer state after 3 steps equal the
    run without it (the workers' gradients are only summed in another order), and the noise metrics are
    the same on 8, 2 and 1 devices and with accumulation (each worker's gradient is over its own n)."""
    off, m_off = _three_steps(2, False)
    ref, m_ref = _three_steps(8, True)
    for tree in ("params", "batch_stats", "opt_state"):
        assert np.allclose(_flat(getattr(ref, tree)), _flat(getattr(off, tree)), rtol=1e-5, atol=1e-6), tree
    assert m_ref["loss"] == pytest.approx(m_off["loss"], rel=1e-6) and "noise_scale" not in m_off
    for d, acc in [(2, 1), (1, 1), (1, 4)]:
        got, m = _three_steps(d, True, accumulation_steps=acc)
        assert np.allclose(_flat(got.params), _flat(ref.params), rtol=1e-5, atol=1e-6), (d, acc)
        for key in ("noise_scale", "noise_g2", "noise_trace", "noise_scale_run"):
            assert m[key] == pytest.approx(m_ref[key], rel=1e-4), (d, acc, key)


def test_off_is_the_same_program_as_before():
    """Free when off: the step built with ``noise_scale=False`` lowers to exactly the program built
    without the argument, and its state carries nothing for it."""
    model, tx = tiny_bn_net(), optax.sgd(0.1)
    lay = layout_lib.make_layout(8, 2)
    state = train.create_train_state(model, tx, lay, (8, 8, 1), seed=0)
    assert state.noise == {}
    images = jax.ShapeDtypeStruct((32, 8, 8, 1), jnp.float32, sharding=lay.sharding(jax.sharding.PartitionSpec(layout_lib.AXIS)))
    labels = jax.ShapeDtypeStruct((32,), jnp.int32, sharding=images.sharding)
    texts = [
        train.make_train_step(model, tx, optax.constant_schedule(0.1), lay, per_worker_batch_size=4, **kw)
        .lower(state, images, labels)
        .as_text()
        for kw in ({}, {"noise_scale": False})
    ]
    assert texts[0] == texts[1]
    on = train.create_train_state(model, tx, lay, (8, 8, 1), seed=0, noise_scale=True)
    text_on = (
        train.make_train_step(model, tx, optax.constant_schedule(0.1), lay, per_worker_batch_size=4, noise_scale=True)
        .lower(on, images, labels)
        .as_text()
    )
    assert text_on != texts[0]


def test_refused_where_it_has_no_meaning():
    model, tx = tiny_bn_net(), optax.sgd(0.1)
    with pytest.raises(ValueError, match="k >= 2"):
        train.make_train_step(model, tx, optax.constant_schedule(0.1), layout_lib.make_layout(1, 1),
                              per_worker_batch_size=4, noise_scale=True)
    with pytest.raises(ValueError, match="allreduce"):
        train.make_train_step(model, tx, optax.constant_schedule(0.1), layout_lib.make_layout(8, 2),
                              per_worker_batch_size=4, noise_scale=True,
                              strategy=strategies.DPSGD(topology="ring", num_workers=8))
