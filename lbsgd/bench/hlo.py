"""``python -m lbsgd.bench hlo``: the size of the compiled train step, beside the Flax example's.

Compiles lbsgd's train step (``lbsgd.trainer.build``, as a run builds it) for one model, k workers x n
images on one device, and counts the instructions of the optimized HLO's entry computation: how many
kernels and buffers the step is made of, which on an accelerator is a proxy for its launch and memory
overhead. ``--flax_dir`` compiles the Flax ImageNet example's own ``train_step`` on the same model, batch
and device and prints the ratio. Also counted: ``is-finite`` ops in the whole module (the non-finite
check), fusions, copies and the most common ops. Nothing is run, only compiled.
"""

from __future__ import annotations

import collections
import re
from typing import Sequence

from lbsgd import cli
from lbsgd.bench import common
from lbsgd.bench.peers import flax as flax_peer
from lbsgd.errors import PeerError

_OP = re.compile(r"=\s+(?:\([^=]*?\)|\S+)\s+([a-z][\w.-]*)\(")


def hlo_counts(text: str) -> dict:
    """Counts of an optimized HLO module's text (``compiled.as_text()``): the entry computation's
    instructions by op, their total, fusions, copies, and ``is-finite`` ops anywhere in the module."""
    start = text.index("ENTRY")
    end = text.find("\n}\n", start)
    entry = text[start : end if end >= 0 else len(text)]
    ops = collections.Counter(m.group(1) for line in entry.splitlines()[1:] for m in [_OP.search(line)] if m)
    return {
        "entry_instructions": sum(ops.values()),
        "fusions": ops.get("fusion", 0),
        "copies": ops.get("copy", 0),
        "is_finite": len(re.findall(r"\bis-finite\(", text)),
        "top_ops": dict(ops.most_common(8)),
    }


EXAMPLES = (
    "python -m lbsgd.bench hlo --model=resnet8 --model_width=16 --image_size=8 --num_classes=10 --dtype=float32",
    "python -m lbsgd.bench hlo --model=resnet50 --per_worker_batch_size=8 --image_size=64 --json=hlo.json",
    "python -m lbsgd.bench hlo --model=resnet50 --per_worker_batch_size=8 --image_size=64 --flax_dir=$HOME/flax",
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``bench hlo``."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench hlo",
        description="Instruction counts of the compiled train step (optimized HLO), beside the Flax example's.",
        examples=EXAMPLES,
    )
    ap.add_argument("--model", default="resnet50", help="a ResNet of lbsgd.models.resnet (resnet4 ... resnet152)")
    ap.add_argument("--model_width", type=int, default=0, help="channels of the first stage (default 0: the model's)")
    ap.add_argument("--image_size", type=cli.positive(int), default=64, help="input size in pixels")
    ap.add_argument("--num_classes", type=cli.positive(int), default=1000, help="classes")
    ap.add_argument("--num_workers", type=cli.positive(int), default=1, help="k, workers")
    ap.add_argument("--per_worker_batch_size", type=cli.positive(int), default=8, help="n, images per worker")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--flax_dir", default=None, help="a google/flax checkout: count its step too")
    ap.add_alias("--flax-dir", "--flax_dir")
    ap.add_argument("--json", default=None, help="write the counts to this path")
    return ap


def lbsgd_counts(args) -> dict:
    """Compile lbsgd's step for ``args`` on one device and count its HLO."""
    from lbsgd.bench import harness  # imports JAX: after the flags are parsed
    from lbsgd.parallel import layout as layout_lib

    config = harness.bench_config(
        args.model, num_workers=args.num_workers, per_worker_batch_size=args.per_worker_batch_size,
        image_size=args.image_size, dtype=args.dtype, model_width=args.model_width,
    )  # fmt: skip
    layout = layout_lib.make_layout(args.num_workers, 1)
    program = harness.build_program(config, layout, num_classes=args.num_classes)
    state = program.init_state()
    kn = args.num_workers * args.per_worker_batch_size
    images, labels = harness.random_batch(kn, args.image_size, args.num_classes)
    batch = layout_lib.global_batch(layout, {"image": images, "label": labels})
    return hlo_counts(program.train_step.lower(state, batch["image"], batch["label"]).compile().as_text())


def flax_counts(args) -> dict:
    """Compile the Flax example's step on the same model, batch and device and count its HLO."""
    import jax

    from lbsgd.bench import harness

    train, models = flax_peer.load_flax_example(args.flax_dir)
    kn = args.num_workers * args.per_worker_batch_size
    images, labels = harness.random_batch(kn, args.image_size, args.num_classes)
    step, state, batch = flax_peer.flax_program(
        train, models, model=args.model, width=args.model_width or 64, dtype=args.dtype,
        num_classes=args.num_classes, devices=jax.devices()[:1], images=images, labels=labels,
    )  # fmt: skip
    return hlo_counts(step.lower(state, batch).compile().as_text())


def main(argv: Sequence[str]) -> int:
    """Print lbsgd's (and the Flax example's) compiled-step counts; returns the exit status."""
    ap = make_parser()
    args = ap.parse_args(list(argv))
    if args.flax_dir:
        if args.model not in flax_peer.FLAX_MODELS:
            ap.error(f"--flax_dir needs an ImageNet model the Flax example has: {', '.join(flax_peer.FLAX_MODELS)}")
        try:
            flax_peer.find_flax_example(args.flax_dir)
        except PeerError as e:
            ap.error(str(e))
    result = {"model": args.model, "dtype": args.dtype, "num_workers": args.num_workers}
    result.update(per_worker_batch_size=args.per_worker_batch_size, image_size=args.image_size)
    result["lbsgd"] = lbsgd_counts(args)
    rows = [("lbsgd", result["lbsgd"])]
    if args.flax_dir:
        result["flax"] = flax_counts(args)
        result["ratio"] = result["lbsgd"]["entry_instructions"] / result["flax"]["entry_instructions"]
        rows.append(("flax example", result["flax"]))
    print(f"{'step':<14} {'instructions':>12} {'fusions':>8} {'copies':>7} {'is-finite':>9}")
    for name, c in rows:
        print(f"{name:<14} {c['entry_instructions']:>12} {c['fusions']:>8} {c['copies']:>7} {c['is_finite']:>9}")
    if "ratio" in result:
        print(f"lbsgd / flax instructions: {result['ratio']:.3f}")
    common.write_json(args.json, result)
    return 0
