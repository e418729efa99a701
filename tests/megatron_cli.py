"""TEST-ONLY: the ``stagecraft`` command with the CPU compat layer for megatron-core applied first.

    python -m torch.distributed.run --nproc_per_node=N tests/megatron_cli.py <hydra overrides>

Each worker is already under the launcher (LOCAL_RANK is set), so the command runs the stage in place
instead of re-launching itself, and everything after the patch is the product's own code path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import megatron_compat  # noqa: E402

megatron_compat.apply()

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
