#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install stagecraft into it.
#
#   bash launch/setup.sh            # .venv in the repository root
#   VENV=/path/to/env bash launch/setup.sh
#
# torch is installed first, on its own, so that the project's dependencies never make pip choose a
# torch build for you: on a CPU-only machine whose pip has the CPU wheel available, `torch==2.13.0`
# resolves to it; set TORCH_SPEC to pick another build or version (e.g. a CUDA build on a GPU node).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.stagecraft-install"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $torch_spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import trainer, torch, deepspeed" 2>/dev/null; then
  echo "setup: $venv is up to date"
  exit 0
fi
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "$torch_spec"
fi
"$py" -m pip install -q -e "$root[dev]"
echo "$want" > "$stamp"
"$py" -c "import torch, deepspeed, megatron.core, transformers; print('setup: torch', torch.__version__, \
'| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
