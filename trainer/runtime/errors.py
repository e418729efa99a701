"""The errors a run ends with, each with its own documented exit code (docs/fault-tolerance.md).

A requeue script tests the code: ``75`` (preempted, a checkpoint was written) means "submit the same
command again"; every other non-zero code means a person has to look. Under torchrun the launcher
cannot see a worker's own exit code (torchrun reports 1 for any worker failure), so rank 0 also writes
the code and the message to ``<run.dir>/exit.json`` and the ``stagecraft`` launcher exits with it.
"""

from __future__ import annotations

import errno

# code -> meaning, the table docs/fault-tolerance.md reproduces.
EXIT_CODES = {
    0: "success: every stage finished and exported",
    1: "unexpected error (a bug or an environment failure; the traceback says where)",
    2: "bad input, found before training: a config key, a data record, a model path",
    3: "diverged: stage.max_bad_steps consecutive non-finite steps; nothing exported",
    4: "refused: run.dir is locked by a live job, or its stages were made with a different config",
    5: "a collective timed out (parallel.timeout_minutes): a rank hung or died",
    6: "a checkpoint could not be written (e.g. no space left on device); the previous one is intact",
    75: "preempted: stopped on a signal after writing a checkpoint; rerun the same command to resume",
}


class RunError(RuntimeError):
    """An error stagecraft diagnosed; ``code`` is the process exit code it maps to."""

    code = 1


class BadInput(RunError):
    code = 2


class Diverged(RunError):
    code = 3


class Refused(RunError):
    code = 4


class CollectiveTimeout(RunError):
    code = 5


class CheckpointWriteError(RunError):
    code = 6


class Preempted(RunError):
    code = 75


def exit_code_for(err: BaseException) -> int:
    """The exit code of a run that ended with ``err``."""
    from trainer.config.validate import ConfigError
    from trainer.data.records import DataError

    if isinstance(err, RunError):
        return err.code
    if isinstance(err, (ConfigError, DataError)):
        return BadInput.code
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return CheckpointWriteError.code
    return 1


def report_failure(prog: str, err: BaseException) -> int:
    """For a subcommand's ``except`` block: a diagnosed error becomes one line on stderr
    (``<prog>: error: ...``) and its exit code; anything else is re-raised with its traceback."""
    code = exit_code_for(err)
    if code == 1:
        raise err
    import sys

    print(f"{prog}: error: {err}", file=sys.stderr)
    return code
