"""The bootstrap's competence check: the teacher must beat the student on validation (C1 presumes it)."""

import pytest

from stages.recipes.bootstrap import TeacherNotBetter, check_teacher_beats_student


def test_a_better_teacher_passes():
    check_teacher_beats_student({"avg@4": 0.30}, {"avg@4": 0.05}, 4)


@pytest.mark.parametrize(("t", "s"), [(0.05, 0.30), (0.2, 0.2)])
def test_a_teacher_that_does_not_beat_the_student_is_a_clear_failure(t, s):
    with pytest.raises(
        TeacherNotBetter, match=r"teacher \(validation avg@4 .*\) does not beat the student .*bootstrap.teacher_steps"
    ):
        check_teacher_beats_student({"avg@4": t}, {"avg@4": s}, 4)


def test_two_models_that_solve_nothing_are_only_a_warning(caplog):
    check_teacher_beats_student({"avg@2": 0.0}, {"avg@2": 0.0}, 2)
    assert "vacuous" in caplog.text
