"""K controllers keep their bounds and follow their rules."""

from __future__ import annotations

import random

import pytest

from lab.engine.controllers import AdaptiveK, FixedK, HeuristicK, make_controller


def test_adaptive_stays_within_bounds():
    rng = random.Random(0)
    controller = AdaptiveK(k=4, window=3, step=2, target=0.6, min_k=2, max_k=7)
    seen = set()
    for _ in range(2000):
        k = controller.next_k()
        seen.add(k)
        assert 2 <= k <= 7
        controller.update(k, rng.randint(0, k))
    assert seen >= {2, 7}  # it does move across the whole range


def test_adaptive_moves_with_acceptance():
    controller = AdaptiveK(k=4, window=2, step=1, target=0.5, min_k=1, max_k=6)
    for _ in range(20):
        controller.update(controller.next_k(), controller.next_k())  # everything accepted
    assert controller.next_k() == 6
    for _ in range(20):
        controller.update(controller.next_k(), 0)  # nothing accepted
    assert controller.next_k() == 1


def test_heuristic_matches_hugging_face_schedule():
    controller = HeuristicK(3)
    controller.update(3, 3)
    assert controller.next_k() == 5
    controller.update(5, 2)
    assert controller.next_k() == 4
    for _ in range(10):
        controller.update(controller.next_k(), 0)
    assert controller.next_k() == 1


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_refused(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        FixedK(k)


def test_make_controller_errors():
    with pytest.raises(ValueError, match="unknown controller 'pid'.*fixed.*adaptive.*heuristic"):
        make_controller("pid", 3)
    with pytest.raises(ValueError, match="bad parameters for controller 'fixed'"):
        make_controller("fixed", 3, window=2)
    with pytest.raises(ValueError, match="min_k"):
        make_controller("adaptive", 3, min_k=5, max_k=2)
