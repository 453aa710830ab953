r"""Default experiment: k=8 workers x n=16 digits on a small ResNet (the README's first command).

Command:
  python -m lbsgd.main --config=experiments/digits.py --workdir=runs/digits

Hardware: any; on a 2-core CPU, one device: about 15 s of training, 35 s in all (8 simulated
devices: about 1 minute).
Expected: >= 98.5% test accuracy on the 360 held-out scikit-learn digits (99.17-99.44 % on seeds 0-2).
Override anything from the command line, e.g. --config.num_workers=16 --config.num_epochs=10.
"""

import ml_collections


def get_config():
    """Returns the digits config (names as in GUIDE.md §3)."""
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "digits"
    c.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.augment = "shift"  # 'none' | 'shift' (digits) | 'inception' (ImageNet-style crop + flip)
    c.image_size = 8
    # Workers (Goyal's k and n); the global minibatch k*n is derived, never set.
    c.num_workers = 8
    c.per_worker_batch_size = 16
    c.num_devices = 0  # 0 = all local devices of every process; must divide num_workers
    c.accumulation_steps = 1  # >1: a device runs its k/d workers in this many sequential microsteps
    c.max_device_batch = 0  # with accumulation_steps=0: fewest microsteps with <= this many examples each
    # How workers combine (lbsgd.strategies): 'allreduce' | 'dpsgd' | 'gossip_pull' | 'gossip_push' |
    # 'easgd' | 'async_ps'.
    c.strategy = "allreduce"
    c.aggregation = "psum"  # allreduce: 'psum' | 'ring' | 'halving_doubling'
    c.bucket_mb = 25.0
    # dpsgd: 'ring' | 'exponential' | 'complete' | 'one_peer_exponential'; gossip: 'random' (push also
    # 'one_peer_exponential'); '' = the strategy's default (ring for dpsgd, random for gossip).
    c.topology = ""
    c.dpsgd = ml_collections.ConfigDict({"form": "awc"})  # 'awc' (Lian et al.) | 'atc' (adapt then combine)
    c.gossip = ml_collections.ConfigDict({"pool_size": 32})  # seeded random peer assignments to draw from
    # easgd: moving rate alpha = beta / k, an exchange with the centre every `period` steps.
    c.easgd = ml_collections.ConfigDict({"beta": 0.8, "period": 1})
    # async_ps: gradients up to `staleness` server steps old; pulls 'fixed' (staggered) or 'random'.
    c.async_ps = ml_collections.ConfigDict({"staleness": 0, "delay": "fixed"})
    # Model.
    c.model = "resnet8"  # 3 residual blocks: >= 98.5 % in 20 epochs (99.17-99.44 % over seeds 0-2)
    c.model_width = 16
    c.dtype = "float32"
    c.label_smoothing = 0.0
    # Optimizer (lbsgd.optim.from_config).
    c.optimizer = "goyal_sgd"
    c.lars_trust_ratio = "optax"  # lars: 'optax' (||g + wd w||) | 'paper' (||g|| + wd ||w||, You et al.)
    c.base_learning_rate = 0.4  # per base_batch_size examples
    c.base_batch_size = 256
    # How the rate grows with kn: 'linear' (Goyal, eta * kn / 256) | 'sqrt' | 'saturating'
    # (eta_max / (1 + b_noise / kn), McCandlish et al.; needs b_noise, or b_noise_from = a workdir or
    # results.json of a run with noise_scale=True; lr_max = 0: eta * b_noise / 256).
    c.lr_scaling = "linear"
    c.b_noise = 0.0
    c.b_noise_from = ""
    c.lr_max = 0.0
    c.warmup = "gradual"
    c.warmup_epochs = 2
    c.decay = "cosine"
    c.decay_epochs = ()
    c.decay_factor = 0.1
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 5e-4
    c.momentum_correction = True
    c.num_epochs = 20
    # Bookkeeping.
    c.seed = 0
    c.eval_batch_size = 128  # examples per eval step over all devices
    c.log_every_steps = 20
    c.eval_every_epochs = 10
    c.checkpoint_every_steps = 200
    c.max_steps = -1  # >0: stop early after this many steps (smoke tests)
    # Estimate the gradient noise scale B_simple = tr(Sigma)/|G|^2 from the workers' gradients (allreduce,
    # k >= 2; results.json noise_scale); its moving average decays by noise_scale_decay per step.
    c.noise_scale = False
    c.noise_scale_decay = 0.99
    c.target_accuracy = 0.0  # >0: results.json's seconds_to_target = time to the first eval reaching it
    # A NaN/inf loss or gradient: 'stop' (exit 3, nothing non-finite saved) or 'skip' the update and
    # stop after max_consecutive_nonfinite skipped steps in a row.
    c.on_nonfinite = "stop"
    c.max_consecutive_nonfinite = 10
    return c
