"""Decode steps of several engines timed alternately in one process (bf16_ab.py, int8_ab.py):
each round restarts every engine on the same prompt, takes one untimed step, then times `steps`
steps; the order flips every round so drift in the machine's speed falls on all alike."""

import statistics
import time

import torch

from lab.engine.caches import Engine


def alternating_step_ms(
    engines: dict[str, Engine], ids: list[int], rounds: int, steps: int = 8
) -> dict[str, list[float]]:
    """Per engine, its mean decode-step time (ms) in each round."""
    token = torch.tensor([[ids[-1]]])
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            engine = engines[name]
            engine.start(ids)
            engine.forward(token, 1)
            start = time.perf_counter()
            for _ in range(steps):
                engine.forward(token, 1)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median step time (ms) of each engine."""
    return {name: round(statistics.median(ts), 1) for name, ts in times.items()}
