"""k-quants (Q4_K_M) through llama.cpp's own quantiser, from llama-cpp-python's low-level API.

gguf-py can write F16/BF16/Q8_0 but has no k-quant encoder; llama.cpp's ``llama_model_quantize``
does, and llama-cpp-python (the optional ``gguf-test`` extra) ships it. It rewrites an F16 GGUF file
into the requested type, choosing per tensor as llama.cpp's ``llama-quantize`` tool does (Q4_K_M
keeps some attention-V and FFN-down tensors at Q6_K, and falls back to a legacy quant for a tensor
whose rows are not a multiple of the 256-value k-quant block).
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.runtime.errors import BadInput

FTYPES = {"q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def require_quantizer():
    """llama_cpp's ``llama_model_quantize``, or BadInput naming what is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise BadInput("--outtype q4_k_m: needs llama.cpp's quantiser, which gguf-py does not have; install "
                       "llama-cpp-python (pip install 'stagecraft[gguf-test]'), or export f16/bf16/q8_0 and run "
                       "llama.cpp's llama-quantize yourself") from None
    if not hasattr(llama_cpp, "llama_model_quantize"):
        raise BadInput(f"--outtype q4_k_m: llama_cpp {getattr(llama_cpp, '__version__', '?')} has no "
                       "llama_model_quantize in its low-level API")
    return llama_cpp


def quantize_file(src: Path, out: Path, outtype: str) -> Path:
    """Quantise the GGUF file ``src`` into ``out`` (written as ``<out>.tmp``, then renamed)."""
    import ctypes

    llama_cpp = require_quantizer()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[outtype]
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {out}, {outtype}) failed with code {code}")
    os.replace(tmp, out)
    return Path(out)
