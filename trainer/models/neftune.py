"""NEFTune: uniform noise on input embeddings during fine-tuning (Jain et al. 2023, Alg. 1).

noise ~ U(-1, 1) * alpha / sqrt(L * d) for a batch of sequence length L and hidden size d. The noise
comes from a generator the stage reseeds before every forward from (seed, step, micro-batch, dp rank),
so a resumed run draws exactly the noise the uninterrupted run drew.
"""

from __future__ import annotations

import torch


class NEFTune:
    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.generator = torch.Generator()
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def reseed(self, *keys: int) -> None:
        seed = 1  # nonzero start: (0, 5) and (5,) must not collide
        for key in keys:  # a fixed mixing of the keys; Python's hash() is salted per process
            seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
        self.generator.manual_seed(seed)

    def _hook(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.alpha == 0:
            return output
        scale = self.alpha / (output.size(1) * output.size(2)) ** 0.5
        noise = torch.rand(output.shape, generator=self.generator, dtype=torch.float32) * 2 - 1
        return output + (noise * scale).to(device=output.device, dtype=output.dtype)

    def remove(self) -> None:
        self._handle.remove()
