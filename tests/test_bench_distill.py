"""bench/bench_distill.py's verdicts without training anything: the issue's two goals (4 student steps within 10%
of the teacher's 25-step FID; 2 student steps better than any solver at 4, in every seed) and the equal-steps
comparison with the better of the teacher's two solvers. (The benchmark itself runs in --quick mode in
tests/test_bench.py.)"""

from __future__ import annotations

from argparse import Namespace

from bench import bench_distill

ARGS = Namespace(student_steps=[1, 2, 4], solver_steps=[2, 4])


def config(fids: list[float]) -> dict:
    return bench_distill.summarise([{"seed": seed, "fid": fid, "kid": fid / 100, "sample_s_per_image": 0.01}
                                    for seed, fid in enumerate(fids)])


def configs(student4: list[float], student2: list[float]) -> dict:
    """The teacher scores 1.0 at 25 DPM-Solver++ steps; at 4 steps DPM-Solver++ 2.0 and UniPC 1.8 (the better)."""
    return {"teacher dpmsolver++@25": config([1.0, 1.0, 1.0]),
            "teacher dpmsolver++@4": config([2.0, 2.0, 2.0]), "teacher unipc@4": config([1.8, 1.8, 1.8]),
            "teacher dpmsolver++@2": config([5.0, 5.0, 5.0]), "teacher unipc@2": config([6.0, 6.0, 6.0]),
            "student@1": config([3.0, 3.0, 3.0]), "student@2": config(student2), "student@4": config(student4)}


def test_both_goals_met():
    lines = bench_distill.verdicts(ARGS, configs([1.05, 1.08, 1.0], [1.5, 1.7, 1.6]))
    assert lines[0].startswith("4 student steps are within 10% of the teacher's 25-step FID")
    assert lines[1].startswith("2 student steps beat the best solver at 4 steps (teacher unipc@4)")
    assert "better in 3 of 3 seeds" in lines[1]


def test_goals_missed_when_4_steps_are_11_percent_off_or_one_seed_loses():
    lines = bench_distill.verdicts(ARGS, configs([1.11, 1.11, 1.11], [1.5, 1.9, 1.6]))
    assert lines[0].startswith("4 student steps are not within 10%")
    assert lines[1].startswith("2 student steps did not beat the best solver at 4 steps")
    assert "better in 2 of 3 seeds" in lines[1]


def test_equal_steps_lines_compare_with_the_better_solver():
    lines = bench_distill.verdicts(ARGS, configs([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]))
    at_2 = next(line for line in lines if line.startswith("At 2 steps"))
    assert "for the teacher with dpmsolver++ (better in 3 of 3 seeds)" in at_2
    at_4 = next(line for line in lines if line.startswith("At 4 steps"))
    assert "for the teacher with unipc" in at_4
