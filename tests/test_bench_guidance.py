"""bench/bench_guidance.py's choices without training anything: the best weight per guide, the paired comparisons
with unguided sampling at the same steps and at the same compute, and the closing verdict. (The benchmark itself
runs in --quick mode in tests/test_bench.py.)"""

from __future__ import annotations

from argparse import Namespace

import pytest

from bench import bench_guidance


def config(fids: list[float]) -> dict:
    return bench_guidance.summarise([{"seed": seed, "fid": fid, "kid": fid / 100, "sample_s_per_image": 0.01}
                                     for seed, fid in enumerate(fids)])


def configs(best_fids: list[float]) -> dict:
    """Unguided 10.0 at 25 steps and 9.0 at 50 in every seed; each guide at weight 2 `best_fids`, at 3 worse."""
    table = {"unguided@25": config([10.0, 10.0, 10.0]), "unguided@50": config([9.0, 9.0, 9.0])}
    for name in bench_guidance.GUIDES:
        table[f"{name}@2"] = config(best_fids)
        table[f"{name}@3"] = config([fid + 1 for fid in best_fids])
    return table


ARGS = Namespace(weights=[1.0, 2.0, 3.0], sampling_steps=25)


def test_the_best_weight_is_paired_with_unguided_at_the_same_steps_and_compute():
    best = bench_guidance.best_weights(ARGS, configs([8.5, 9.5, 8.0]))
    for entry in best.values():
        assert entry["weight"] == 2.0
        assert entry["same_steps"]["seeds_better"] == 3
        assert entry["same_steps"]["fid_difference_mean"] == pytest.approx((8.5 + 9.5 + 8.0) / 3 - 10)
        assert entry["same_compute"]["seeds_better"] == 2


@pytest.mark.parametrize("fids, verdict", [([8.5, 8.9, 8.0], "Guidance beat"),
                                           ([8.5, 9.5, 8.0], "Guidance did not beat")])
def test_the_verdict_needs_every_seed_better_at_equal_compute(fids, verdict):
    table = configs(fids)
    sentence = bench_guidance.equal_compute_verdict(ARGS, table, bench_guidance.best_weights(ARGS, table))
    assert sentence.startswith(verdict + " unguided sampling at equal compute")
