"""``train_and_evaluate``: one run from its config to results.json, resuming where a previous one stopped."""

from __future__ import annotations

import logging
from typing import Any

from lbsgd import checkpoint
from lbsgd.errors import NonFinite
from lbsgd.trainer.loop import train_loop
from lbsgd.trainer.results import write_results
from lbsgd.trainer.setup import restore_or_init, setup

log = logging.getLogger("lbsgd")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its latest intact checkpoint) and return results.json's
    dict.

    Before anything is compiled, a workdir with checkpoints is checked against the config it recorded
    (``checkpoint.check_resume``: ``CheckpointError`` if the state or data order would differ). Raises
    ``NonFinite`` (after committing the saves in flight) when training produced a non-finite value.
    """
    changed = checkpoint.check_resume(workdir, config)
    if changed:
        log.info(
            "resuming with changed config fields: %s", ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        )
    run = setup(config, workdir)
    if run.is_chief:
        checkpoint.record_config(workdir, config)
    run.writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    mngr = checkpoint.manager(workdir)
    state = restore_or_init(run, mngr)
    program = run.program
    train_step, eval_step, consensus_fn = program.train_step, program.eval_step, program.consensus_fn
    try:
        result = train_loop(run, state, mngr, train_step, eval_step, consensus_fn)
    except NonFinite as e:
        mngr.wait_until_finished()  # the good checkpoints in flight are committed; the bad state never saved
        raise NonFinite(
            e.step,
            f"{e.how}; the state after it was not saved; last good checkpoint: {checkpoint.describe_latest(workdir)}",
        ) from None
    mngr.wait_until_finished()
    results = write_results(run, result, eval_step, consensus_fn)
    mngr.close()
    run.writer.flush()
    return results
