"""Random generators seeded from a key of integers, so that a random draw is a function of where
it happens (run seed, rank, iteration, sample position) rather than of what ran before it."""

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

__all__ = ["mix", "seed_all", "seeded"]


def mix(*numbers: int) -> int:
    """One 32-bit seed from any number of non-negative integers (numpy's SeedSequence: nearby
    keys give unrelated seeds)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


def seed_all(*key: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CPU and every CUDA device) from `key`."""
    seed = mix(*key)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(*key: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU generators seeded from `key`, restored on exit: the
    augmentations detectron2's mappers draw inside are then a function of `key` alone, and the
    caller's random stream is left where it was."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    seed = mix(*key)
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)  # the CPU's only: CUDA's is training's
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
