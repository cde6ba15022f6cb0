"""docs/data-free.md's usage block says what train_dafl and pu_compress do to the student
they are given (trained in place, and returned), as their docstrings and tests/datafree
test_dafl.py / test_pu.py check (``out is student``)."""

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "data-free.md"


def test_the_usage_block_says_the_student_is_trained_in_place_and_returned():
    usage = DOC.read_text().split("```python", 1)[1].split("```", 1)[0]
    lines = usage.splitlines()
    for call in ("= train_dafl(teacher, student", "= pu_compress(student, teacher"):
        at = next(i for i, line in enumerate(lines) if call in line)
        comment = " ".join(line for line in lines[at - 2 : at] if line.lstrip().startswith("#"))
        assert "student is trained in place and returned" in comment, call
