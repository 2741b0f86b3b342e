"""Choosing the next token: temperature, nucleus (top-p) filtering and a per-request RNG.

Sampling runs on CPU float32 copies of the logits so that the same seed gives the same tokens
whatever device or dtype the model runs in, and so that no request ever touches torch's global
RNG (concurrent or interleaved requests would otherwise perturb each other's randomness).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

# V = vocabulary size

# A seed drawn for requests without one; 63 bits keeps it a non-negative int64 for torch.
_SEED_BITS = 63


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation (validated by the caller, e.g. the server's schemas).

    ``logprobs`` is the number of alternatives to report per token (0: only the chosen token's
    log-probability; None: no log-probabilities at all).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


def make_generator(seed: int | None) -> torch.Generator:
    """A private CPU generator: seeded from the request, or from the OS when no seed is given."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(secrets.randbits(_SEED_BITS) if seed is None else seed)
    return generator


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Pick one token id from ``logits`` ``[V]`` (CPU float32).

    Temperature 0 is greedy (the first maximal logit, like ``argmax``). Otherwise the smallest set of
    most probable tokens whose mass reaches ``top_p`` is kept (always at least one token), and one
    token is drawn from it with ``generator``.
    """
    if temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / temperature, dim=-1)  # [V]
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator).item())
    # A stable sort makes ties deterministic, so the seed alone decides the outcome.
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)  # [V], [V]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = mass_before < top_p
    keep[0] = True
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return int(order[choice].item())


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of ``logprobs`` ``[V]`` as ``(token_id, logprob)``, best first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
