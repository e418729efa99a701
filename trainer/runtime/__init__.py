"""What keeps a run honest as a process: exit codes, the run.dir lock, stop signals, stage identity."""

from trainer.runtime.errors import (EXIT_CODES, BadInput, Diverged, Preempted, Refused, RunError,
                                    exit_code_for)

__all__ = ["EXIT_CODES", "BadInput", "Diverged", "Preempted", "Refused", "RunError", "exit_code_for"]
