"""Stopping on a signal at a step boundary, with a checkpoint, on every rank at once.

Slurm sends SIGTERM (or the signal given to ``--signal``) some time before it kills a job; a spot
instance gets SIGTERM before it goes away. A handler only sets a flag: stopping inside a step would
leave ranks in different collectives. After each step the ranks OR their flags in one all-reduce
over the world, so they all stop after the same step; the stage loop then checkpoints and raises
:class:`Preempted` (exit code 75).
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)
_received: list[str] = []


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    if not _received:
        log.warning("received %s: stopping after the current step, with a checkpoint", name)
    _received.append(name)


def signal_numbers(names) -> list[int]:
    """``["SIGTERM", "SIGUSR1"]`` -> their numbers; a bad name raises ValueError naming it."""
    numbers = []
    for name in names:
        try:
            numbers.append(int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]))
        except KeyError:
            raise ValueError(f"run.stop_signals: unknown signal {name!r}") from None
    return numbers


def install(names) -> None:
    """Make the listed signals request a stop instead of killing the process. A signal received
    earlier (e.g. during a previous stage's export) stays pending: the next step boundary stops."""
    for number in signal_numbers(names):
        signal.signal(number, _handler)


def requested() -> str | None:
    """The first signal received by this process, if any (local; see :func:`agreed`)."""
    return _received[0] if _received else None


def agreed(world_size: int, device) -> bool:
    """Collective over the world: has any rank been asked to stop?"""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
