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
# llama.cpp's Python bindings, for the GGUF round trips in tests/test_export.py. pip compiles llama.cpp
# for them; building only the library the bindings load (no tools, server, examples, tests or the
# multimodal code) took 5 min of CPU time on the shared 2-core machine, against 39 min wall for the
# default build. GGML_NATIVE=OFF: a generic x86-64 build, so the wheel pip caches runs on any CPU.
if ! "$py" -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF}" \
    "$py" -m pip install -q -e "$root[gguf-test]"
fi
echo "$want" > "$stamp"
"$py" -c "import torch, deepspeed, megatron.core, transformers; print('setup: torch', torch.__version__, \
'| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
