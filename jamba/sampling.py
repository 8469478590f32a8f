"""Next-token sampling with per-request parameters and random generators.

Each row draws its one uniform number from its own `torch.Generator` and picks the token where that number falls
in its cumulative distribution, so a seeded request draws the same tokens whether it runs alone or in a batch
beside others. The rest (temperature, softmax, cumulative sums, the lookup) runs batched over the rows.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 picks the most likely token (greedy)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None draws from a nondeterministic seed

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits outside the top-k / top-p set of one row (V,) to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the tokens before it already reach top_p; the most likely token always stays.
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row of logits (B, V); returns (B,) long on the CPU."""
    logits = logits.float().cpu()
    tokens = logits.argmax(-1)
    rows = [row for row, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    temperature = torch.tensor([params[row].temperature for row in rows])
    scaled = logits[rows] / temperature[:, None]
    for i, row in enumerate(rows):
        p = params[row]
        if p.top_k or p.top_p < 1.0:
            scaled[i] = filter_logits(scaled[i], p.top_k, p.top_p)
    probs = torch.softmax(scaled, dim=-1)
    cdf = probs.cumsum(-1)
    uniform = torch.stack([torch.rand((), generator=generators[row]) for row in rows])
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    # Rounding can put the draw at the very end of the distribution; take the last token that can be drawn.
    last_possible = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    tokens[rows] = torch.minimum(picked, last_possible)
    return tokens
