"""``stagecraft export HF_DIR --format gguf --outtype f16|bf16|q8_0|q4_k_m [--out FILE.gguf]``.

Converts a stage's HF export (``<run.dir>/stages/<stage>/hf``, or any local Llama / Qwen2 / Mistral
directory) into one GGUF file for llama.cpp, tokenizer and chat template included (docs/export.md).
Exit codes are the run's (trainer/runtime/errors.py): 0 written, 2 bad input (a family or tokenizer
llama.cpp cannot take, a missing file, q4_k_m without llama.cpp's quantiser), with
``stagecraft export: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.export.gguf import FAMILIES, OUTTYPES
from trainer.runtime.errors import report_failure

FORMATS = ("gguf",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagecraft export", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("hf_dir", help="a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--format", choices=FORMATS, default="gguf", help="output format (default: gguf)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16",
                        help="matrix type; norms and biases stay f32 (default: f16). q4_k_m needs llama-cpp-python")
    parser.add_argument("--out", default=None, help="output file (default: beside HF_DIR: <stage>/<stage>-OUTTYPE.gguf "
                        "for a stage's hf/ export, else HF_DIR-OUTTYPE.gguf)")
    parser.epilog = f"Supported model families: {', '.join(sorted(FAMILIES))}."
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file chatter ("for Little Endian only")
    from trainer.export.gguf import export_gguf

    try:
        path = export_gguf(args.hf_dir, args.out, args.outtype)
    except Exception as err:  # noqa: BLE001  (a diagnosed error: its one-line message and exit code)
        return report_failure("stagecraft export", err)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
