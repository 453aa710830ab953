r"""Goyal et al.'s recipe in an ordinary Flax training loop.

    pip install lbsgd scikit-learn        # or, from a clone: pip install -e '.[train]'
    python examples/flax_loop.py          # about 10-20 s on a laptop CPU; prints the test accuracy

The loop is plain Flax: a linen model with BatchNorm, ``flax.training.train_state.TrainState`` and
``jax.jit``. From lbsgd it takes only the optax pieces (``lbsgd.optim``):

* ``goyal_schedule``: the Linear Scaling Rule (§2.1) for kn examples, gradual warmup (§2.2), decay;
* ``goyal_sgd``: weight decay as its own gradient term on weights only (Remark 1), then momentum SGD
  with the momentum correction (eq. 10, Remark 2).

And it does what the paper does with BatchNorm (§2.3): the global minibatch of k·n examples is k
**workers** of n examples, and each worker's BN statistics are over its own n examples, whatever
hardware runs them. Here that is one ``jax.vmap`` over a worker axis; the loss is the mean over all kn
examples (Remark 3: each worker's summed loss divided by kn), so its gradient is the workers'
gradients summed. Each worker updates the BN running averages from its own batch; since the update is
linear, keeping the mean of the k updated averages equals averaging k separate copies at the end.
With several devices, put the worker axis on a mesh axis (``shard_data``) and ``jax.jit`` runs the
workers where their data lies; nothing else changes.

Data: scikit-learn's 1,797 8×8 handwritten digits (shipped inside scikit-learn, nothing downloaded):
1,437 for training, 360 held out.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

# --- snippet ---
from lbsgd.optim import goyal_schedule, goyal_sgd
# --- end snippet ---

K, N = 8, 16  # k workers x n examples each: a global minibatch of kn = 128
EPOCHS = 20


class CNN(nn.Module):
    """A small convolutional net with BatchNorm (momentum 0.9 as in the paper's ResNets)."""

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits for a batch of 8x8x1 images; BN over this batch in training."""
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.relu(norm()(nn.Conv(32, (3, 3), use_bias=False)(x)))
        x = nn.relu(norm()(nn.Conv(64, (3, 3), strides=2, use_bias=False)(x)))
        x = nn.relu(norm()(nn.Conv(64, (3, 3), use_bias=False)(x)))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the BatchNorm running averages."""

    batch_stats: dict


def load_digits(seed: int = 0):
    """(train_x, train_y, test_x, test_y): digits scaled to [0, 1], a seeded 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:360], order[360:]
    return images[train], data.target[train], images[test], data.target[test]


def create_state(steps_per_epoch: int, seed: int = 0) -> TrainState:
    """Initial state with the Goyal optimizer: η = 0.4 per 256 examples, linearly scaled to kn."""
    model = CNN()
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)), train=False)
    # --- snippet ---
    schedule = goyal_schedule(
        base_learning_rate=0.4,  # η for 256 examples; the peak is η·kn/256 (Linear Scaling Rule)
        global_batch_size=K * N,
        steps_per_epoch=steps_per_epoch,
        warmup="gradual", warmup_epochs=2,  # from η to η·kn/256 over 2 epochs
        decay="cosine", num_epochs=EPOCHS,
    )
    tx = goyal_sgd(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4)  # no decay on BN or biases
    # --- end snippet ---
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
    )


# --- snippet ---
@jax.jit
def train_step(state: TrainState, images, labels):
    """One step on a global minibatch shaped (k, n, ...): per-worker BN, loss / kn, summed gradients."""

    def worker_loss(params, x, y):  # one worker, its n examples: BN statistics over these n only
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(), updates["batch_stats"]

    def loss_fn(params):
        sums, stats = jax.vmap(worker_loss, in_axes=(None, 0, 0))(params, images, labels)
        kn = labels.size
        return sums.sum() / kn, jax.tree.map(lambda s: s.mean(axis=0), stats)  # Remark 3; mean of k

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss
# --- end snippet ---


@jax.jit
def accuracy(state: TrainState, images, labels):
    """Test accuracy with the running BN averages."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    return (logits.argmax(-1) == labels).mean()


def shard_data(images, labels):
    """Places the worker axis across the available devices (k must be a multiple of their count)."""
    devices = jax.devices()
    if len(devices) == 1 or K % len(devices):
        return images, labels
    mesh = jax.sharding.Mesh(np.array(devices), ("workers",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("workers"))
    return jax.device_put(images, spec), jax.device_put(labels, spec)


def train(seed: int = 0, epochs: int = EPOCHS) -> float:
    """Trains on digits as k = 8 workers x n = 16 examples and returns the test accuracy."""
    train_x, train_y, test_x, test_y = load_digits(seed)
    steps_per_epoch = len(train_x) // (K * N)
    state = create_state(steps_per_epoch, seed)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(train_x))[: steps_per_epoch * K * N].reshape(steps_per_epoch, K, N)
        for batch in order:  # (k, n) indices: worker i's n examples are batch[i]
            state, loss = train_step(state, *shard_data(train_x[batch], train_y[batch]))
        print(f"epoch {epoch + 1:2d}: loss {float(loss):.4f}")
    result = float(accuracy(state, test_x, test_y))
    print(f"test accuracy {result:.4f} ({len(test_y)} held-out digits)")
    return result


if __name__ == "__main__":
    train()
