"""The HiGHS solver behind ``allocate`` prints debug lines with printf, past Python's
streams ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();", three
times in a ``search`` with an ``avg_bits`` budget); they are dropped, anything else passes."""

from __future__ import annotations

import os

import numpy as np

from compactnn.mixed_precision.allocate import allocate, solver_output_filtered

NOISE = b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n"

# the allocation a search of a 4-layer CNN made under Budget(avg_bits=3): HiGHS printed NOISE
# three times while solving it (scipy 1.17.1)
SCORES = np.array(
    [
        [7.46266474e-02, 1.01246013e-02, 4.34268414e-03, 1.46095288e-05],
        [2.47906275e-01, 3.82254836e-02, 1.42570956e-02, 1.04878848e-04],
        [6.35767661e-02, 7.33831461e-03, 1.51424831e-03, 8.28103827e-06],
        [2.80300085e-02, 5.51477665e-03, 1.08501073e-03, 3.03853272e-06],
    ]
)
CODE_BITS = np.array([[288, 432, 576, 1152], [9216, 13824, 18432, 36864]], dtype=float)
CODE_BITS = np.vstack([CODE_BITS, [[18432, 27648, 36864, 73728], [640, 960, 1280, 2560]]])


def test_a_tight_average_bits_budget_is_solved_without_solver_noise(capfd):
    choice = allocate(SCORES, {"code_bits": CODE_BITS}, {"code_bits": 42864.0})
    assert choice.tolist() == [1, 1, 1, 1]  # 3 bits each: exactly the budget
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_only_the_solvers_debug_lines_are_dropped(capfd):
    with solver_output_filtered():
        os.write(1, NOISE + b"a real message\n" + NOISE)
        os.write(2, b"solver error: infeasible\n")
    out, err = capfd.readouterr()
    assert (out, err) == ("a real message\n", "solver error: infeasible\n")
