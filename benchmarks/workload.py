"""The fixed ShareGPT-like request mix every benchmark and every peer runs (issue 4's recipe).

    rng = numpy.random.default_rng(0)
    input lengths  = clip(rng.lognormal(ln 150, 0.8, N), 1, 2048)  as integers (mean ~195)
    output lengths = clip(rng.lognormal(ln 130, 0.8, N), 1, 2048)  as integers (mean ~178)
    prompt i       = rng.integers(100, vocab - 100, size=input_len[i]), drawn in order
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    def prefix(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.output_lens[:n])

    @property
    def num_input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def sharegpt_like(vocab_size: int, num_requests: int = 1000) -> Workload:
    rng = np.random.default_rng(0)
    input_lens = np.clip(rng.lognormal(np.log(150), 0.8, num_requests), 1, 2048).astype(int)
    output_lens = np.clip(rng.lognormal(np.log(130), 0.8, num_requests), 1, 2048).astype(int)
    prompts = [rng.integers(100, vocab_size - 100, size=int(n)).tolist() for n in input_lens]
    return Workload(prompts, [int(n) for n in output_lens])
