"""K controllers: each picks the draft length of the next step from what was accepted so far."""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol


class Controller(Protocol):
    """Chooses K before a step and learns from the step's outcome."""

    def next_k(self) -> int: ...

    def update(self, proposed: int, accepted: int) -> None: ...


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class FixedK:
    """The same K every step."""

    def __init__(self, k: int) -> None:
        self.k = _positive("k", k)

    def next_k(self) -> int:
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        pass


class AdaptiveK:
    """Every `window` steps, raise K by `step` if acceptance beat `target`, else lower it; clamp."""

    def __init__(
        self,
        k: int,
        window: int = 4,
        step: int = 1,
        target: float = 0.7,
        min_k: int = 1,
        max_k: int = 10,
    ) -> None:
        self.min_k = _positive("min_k", min_k)
        self.max_k = _positive("max_k", max_k)
        if min_k > max_k:
            raise ValueError(f"min_k ({min_k}) must be <= max_k ({max_k})")
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"target acceptance rate must be in [0, 1], got {target}")
        self.window = _positive("window", window)
        self.step = _positive("step", step)
        self.target = target
        self.k = min(max(_positive("k", k), min_k), max_k)
        self._history: deque[tuple[int, int]] = deque(maxlen=window)

    def next_k(self) -> int:
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        self._history.append((proposed, accepted))
        if len(self._history) < self.window:
            return
        offered = sum(p for p, _ in self._history)
        rate = sum(a for _, a in self._history) / offered if offered else 0.0
        delta = self.step if rate >= self.target else -self.step
        self.k = min(max(self.k + delta, self.min_k), self.max_k)
        self._history.clear()


class HeuristicK:
    """Hugging Face's assisted-generation schedule: +2 after a fully accepted draft, else -1."""

    def __init__(self, k: int) -> None:
        self.k = _positive("k", k)

    def next_k(self) -> int:
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        self.k = self.k + 2 if accepted == proposed else max(1, self.k - 1)


CONTROLLERS: dict[str, type[FixedK] | type[AdaptiveK] | type[HeuristicK]] = {
    "fixed": FixedK,
    "adaptive": AdaptiveK,
    "heuristic": HeuristicK,
}


def make_controller(name: str, k: int, **params: Any) -> Controller:
    """A fresh controller (one per prompt); unknown names and bad params raise ValueError."""
    if name not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}: use one of {', '.join(CONTROLLERS)}")
    try:
        return CONTROLLERS[name](k, **params)
    except TypeError as err:
        raise ValueError(f"bad parameters for controller {name!r}: {err}") from err
