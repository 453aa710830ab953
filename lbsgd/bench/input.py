"""``python -m lbsgd.bench input``: images/s of the real tf.data training pipeline.

``lbsgd.data.pipeline`` over the folder dataset with the 'inception' augmentation of Goyal §5.1 on
generated JPEGs (or ``--folder``), total and per host CPU core, plus the evaluation view (256 -> 224
center crop). On a GPU host the pipeline must feed (images/s of the step) / (images/s per core) cores.
Imports TensorFlow only when run.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Sequence

import numpy as np

from lbsgd import cli
from lbsgd.bench import common


def write_jpegs(
    root: str, num_images: int, width: int, height: int, num_classes: int = 4, seed: int = 0, quality: int = 90
) -> None:
    """Write ``num_images`` JPEGs under ``root/train/c<i>/`` (and a few under ``root/val``).

    Content: smooth random colour fields plus a little noise, so the files compress like photographs
    (~100 KB at 500x375, about the size of an average ImageNet training JPEG).
    """
    import tensorflow as tf  # optional and heavy: only this subcommand needs it, and only when it runs

    rng = np.random.default_rng(seed)
    for split, count in (("train", num_images), ("val", num_classes)):
        for i in range(count):
            c = i % num_classes
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            low = rng.uniform(0, 255, size=(1, height // 24 + 2, width // 24 + 2, 3)).astype(np.float32)
            img = tf.image.resize(low, [height, width], method="bicubic")[0].numpy()
            img = np.clip(img + rng.normal(0, 18, size=img.shape), 0, 255).astype(np.uint8)
            data = tf.io.encode_jpeg(img, quality=quality).numpy()
            with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)


def time_iterator(it, batch_size: int, warmup: int, batches: int) -> float:
    """Images/s of ``batches`` batches drawn from ``it`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


EXAMPLES = (
    "python -m lbsgd.bench input --num_images=64 --batches=4 --batch_size=16",
    "python -m lbsgd.bench input --json=input.json",
    "python -m lbsgd.bench input --folder=/data/imagenet_folder --batch_size=256 --batches=20",
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``bench input``."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench input",
        description="Throughput of the tf.data ImageNet pipeline on generated JPEGs, in total and per host core.",
        examples=EXAMPLES,
    )
    ap.add_argument(
        "--folder",
        default=None,
        help="an existing folder dataset (train/<class>/*.jpg); default: generate JPEGs in a temporary folder",
    )
    ap.add_argument("--num_images", type=cli.positive(int), default=256, help="JPEGs to generate")
    ap.add_argument("--width", type=cli.positive(int), default=500, help="width of the generated JPEGs in pixels")
    ap.add_argument("--height", type=cli.positive(int), default=375, help="height of the generated JPEGs in pixels")
    ap.add_argument("--image_size", type=cli.positive(int), default=224, help="size of the crops the pipeline makes")
    ap.add_argument("--batch_size", type=cli.positive(int), default=64, help="images per batch (k·n of one host)")
    ap.add_argument("--batches", type=cli.positive(int), default=12, help="timed batches")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--json", default=None, help="write results to this path")
    return ap


def measure(ap: cli.ArgumentParser, args, root: str) -> dict:
    """Images/s of the training pipeline ('inception' crop + flip) and of the evaluation view over the
    folder dataset at ``root``, total and per host core; refuses an unusable dataset in one line."""
    from lbsgd.data import folder, pipeline  # import TensorFlow: only when this subcommand runs

    try:
        ds = folder.load(root)
    except pipeline.DataError as e:
        ap.error(str(e))
    if ds.train.num_examples < args.batch_size:
        ap.error(f"--batch_size={args.batch_size} is larger than the {ds.train.num_examples} images")
    sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(root, "train")) for f in fs]
    mean_kb = sum(sizes) / len(sizes) / 1024
    cores = common.host_cores()
    train_it = pipeline.train_iterator(
        ds,
        num_workers=1,
        per_worker_batch_size=args.batch_size,
        seed=0,
        first_worker=0,
        num_local_workers=1,
        start_step=0,
        augment="inception",
        image_size=args.image_size,
    )
    train_ips = time_iterator(train_it, args.batch_size, args.warmup, args.batches)
    # Evaluation view over the same files, one pass at most.
    eval_ds = dataclasses.replace(ds, eval=ds.train)
    eval_batches = max(1, min(args.batches, ds.train.num_examples // args.batch_size - args.warmup))
    eval_it = pipeline.eval_iterator(
        eval_ds,
        global_batch_size=args.batch_size,
        first_slot=0,
        num_local_slots=args.batch_size,
        augment="inception",
        image_size=args.image_size,
    )
    eval_ips = time_iterator(eval_it, args.batch_size, min(args.warmup, 1), eval_batches)
    return dict(
        images=ds.train.num_examples,
        mean_jpeg_kb=mean_kb,
        image_size=args.image_size,
        batch_size=args.batch_size,
        cores=cores,
        train_images_per_s=train_ips,
        train_images_per_s_per_core=train_ips / cores,
        eval_images_per_s=eval_ips,
        eval_images_per_s_per_core=eval_ips / cores,
    )


def print_result(r: dict) -> None:
    """The three lines of the result: host and JPEGs, the training pipeline, the evaluation view."""
    cores, train_ips, eval_ips = r["cores"], r["train_images_per_s"], r["eval_images_per_s"]
    print(
        f"host cores: {cores}; {r['images']} JPEGs, mean {r['mean_jpeg_kb']:.0f} KB; output {r['image_size']}x"
        f"{r['image_size']}, batch {r['batch_size']}"
    )
    print(f"train (inception crop + flip): {train_ips:8.1f} images/s  = {train_ips / cores:7.1f} per core")
    print(f"eval  (256 -> 224 center crop): {eval_ips:8.1f} images/s  = {eval_ips / cores:7.1f} per core")


def main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench input``: images/s (and per core) of the training and eval input pipeline."""
    ap = make_parser()
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder
        if root is None:
            root = tmp
            t0 = time.perf_counter()
            write_jpegs(root, args.num_images, args.width, args.height)
            print(
                f"generated {args.num_images} JPEGs of {args.width}x{args.height} in {time.perf_counter() - t0:.1f} s"
            )
        result = measure(ap, args, root)
    print_result(result)
    common.write_json(args.json, result)
    return 0
