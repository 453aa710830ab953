"""Where Goyal's k workers run: a 1-D device mesh, m = k/d workers per device, processes in order.

Devices are ordered by (process, local device) so every process owns a contiguous range of mesh
positions, hence a contiguous range of workers: process p feeds workers
``first_worker .. first_worker + local_workers - 1`` and nothing else.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lbsgd.errors import LayoutError

AXIS = "devices"  # the mesh axis; one entry per device, each running k/d workers


@dataclasses.dataclass(frozen=True)
class WorkerLayout:
    """k workers on d devices of P processes (this process is ``process_index``)."""

    num_workers: int
    devices: tuple  # the mesh's devices, in mesh order
    process_index: int
    num_processes: int

    @property
    def num_devices(self) -> int:
        """d, the number of devices in the mesh."""
        return len(self.devices)

    @property
    def workers_per_device(self) -> int:
        """m = k / d."""
        return self.num_workers // self.num_devices

    @property
    def local_device_positions(self) -> list[int]:
        """Mesh positions of this process's devices (contiguous)."""
        return [i for i, dev in enumerate(self.devices) if dev.process_index == self.process_index]

    @property
    def first_worker(self) -> int:
        """The first worker fed by this process."""
        return self.local_device_positions[0] * self.workers_per_device

    @property
    def local_workers(self) -> int:
        """Number of workers fed by this process."""
        return len(self.local_device_positions) * self.workers_per_device

    @property
    def mesh(self) -> Mesh:
        """The 1-D mesh over ``devices`` with axis ``AXIS``."""
        return Mesh(np.array(self.devices), (AXIS,))

    def sharding(self, spec: P = P()) -> NamedSharding:
        """A NamedSharding on this layout's mesh."""
        return NamedSharding(self.mesh, spec)


def check_placement(num_workers: int, num_devices: int, available: int, num_processes: int = 1) -> int:
    """The device count d for k = ``num_workers`` workers (``num_devices`` 0 = all ``available``).

    Raises LayoutError (a one-line fix) unless d devices exist, d is a multiple of the process count,
    and k is a positive multiple of d. Pure: no JAX devices are touched.
    """
    d = num_devices or available
    if d > available:
        raise LayoutError(
            f"config.num_devices={d} but only {available} devices exist; use --config.num_devices=0 (all) "
            f"or at most {available}"
        )
    if d % num_processes:
        raise LayoutError(f"config.num_devices={d} must be a multiple of the process count {num_processes}")
    if num_workers < d or num_workers % d:
        raise LayoutError(
            f"config.num_workers={num_workers} must be a positive multiple of the {d} devices in use; "
            f"set --config.num_workers to a multiple of {d} or --config.num_devices to a divisor of "
            f"{num_workers}"
        )
    return d


def make_layout(num_workers: int, num_devices: int = 0) -> WorkerLayout:
    """Place k = ``num_workers`` workers on ``num_devices`` devices (0 = every device of every process).

    With several processes the devices are taken evenly from each process. Raises LayoutError when
    the device count does not divide k or more devices are asked for than exist.
    """
    nproc, pid = jax.process_count(), jax.process_index()
    everything = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    d = check_placement(num_workers, num_devices, len(everything), nproc)
    per_process = d // nproc
    chosen = []
    for p in range(nproc):
        chosen += [dev for dev in everything if dev.process_index == p][:per_process]
    return WorkerLayout(num_workers=num_workers, devices=tuple(chosen), process_index=pid, num_processes=nproc)


def global_batch(layout: WorkerLayout, local: dict[str, np.ndarray], stacked: bool = False) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the mesh (worker-major). ``stacked``:
    the arrays have a leading axis of steps (several steps' batches for one dispatch), not split."""
    sharding = layout.sharding(P(None, AXIS) if stacked else P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
