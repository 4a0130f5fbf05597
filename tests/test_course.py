"""
The course kit (course/): every assignment's student version is generated from the repository's current
code, its tests all fail before the student's work is done, and they all pass against the repository's own
code (the kit generated with --solution). The folders are graded by course/grade.py, as a student's
`cd assignment_N && python -m pytest` would, one process per kit (torch imported once), both kits at once.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("make_student", os.path.join(ROOT, "course", "make_student.py"))
make_student = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_student)
ASSIGNMENTS = sorted(make_student.ASSIGNMENTS)
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny shapes: one thread is faster, and fair to a busy machine


def start_grading(kit, report):
    folders = [os.path.join(kit, f"assignment_{n}") for n in ASSIGNMENTS]
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "course", "grade.py"), *folders, f"--json={report}"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{('student' | 'solution', n): {test id: outcome}} for every assignment, and the folder that assignment 6's
    experiment wrote its --quick smoke run into (its output itself is graded from the measured sample run
    that the reference kit holds, course/solutions/assignment_6)."""
    kits = {kind: str(tmp_path_factory.mktemp(kind)) for kind in ("student", "solution")}
    for kind, out in kits.items():
        for n in ASSIGNMENTS:
            make_student.build(n, out, solution=kind == "solution")
    reports = {kind: os.path.join(kits[kind], "grades.json") for kind in kits}
    procs = {kind: start_grading(kits[kind], reports[kind]) for kind in kits}
    # meanwhile, the experiment's whole pipeline (train.py, recall, plots) at a toy size, reading the
    # repository's tokenized data if another test already prepared it
    sol6, smoke = os.path.join(kits["solution"], "assignment_6"), str(tmp_path_factory.mktemp("smoke"))
    if os.path.isdir(os.path.join(ROOT, "data", "shakespeare")):
        os.symlink(os.path.join(ROOT, "data"), os.path.join(sol6, "data"))
    r = subprocess.run([sys.executable, "experiment.py", "--quick", f"--out={smoke}"], cwd=sol6, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = {"smoke": smoke}
    for kind, proc in procs.items():
        out = proc.communicate(timeout=600)[0]
        assert os.path.isfile(reports[kind]), out[-3000:]
        with open(reports[kind]) as f:
            graded = json.load(f)
        for n in ASSIGNMENTS:
            res[kind, n] = graded[os.path.join(kits[kind], f"assignment_{n}")]
    return res


def test_experiment_pipeline_runs(outcomes):
    with open(os.path.join(outcomes["smoke"], "results.json")) as f:
        res = json.load(f)
    assert res["quick"] and len(res["runs"]) >= 4
    assert all(r["iters"] == res["settings"]["max_iters"] and r["tok_s"] > 0 for r in res["runs"])
    for name in ("loss", "recall", "speed"):
        assert os.path.getsize(os.path.join(outcomes["smoke"], f"{name}.svg")) > 0


@pytest.mark.parametrize("n", ASSIGNMENTS)
def test_student_version_fails_every_test(outcomes, n):
    got = outcomes["student", n]
    passed = [t for t, o in got.items() if o == "passed"]
    assert got and not passed, f"assignment {n}: these tests pass before the student wrote anything: {passed}"


@pytest.mark.parametrize("n", ASSIGNMENTS)
def test_repository_code_passes_every_test(outcomes, n):
    got = outcomes["solution", n]
    failed = [t for t, o in got.items() if o == "failed"]
    assert got and not failed, f"assignment {n}: these tests fail against the repository's code: {failed}"


def test_every_assignment_has_its_files():
    for n in ASSIGNMENTS:
        for path in (f"course/assignment_{n}.md", f"course/tests/test_assignment_{n}.py"):
            assert os.path.isfile(os.path.join(ROOT, path)), path


def test_blank_source():
    src = 'import x\n\n\nclass A:\n    def f(self, a):\n        """doc"""\n        b = a + 1  # hint\n        return b\n\n\ndef g():\n    return 2\n'
    out = make_student.blank_source(src, 7, ["A.f", "g"])
    assert '"""doc"""' in out and "a + 1" not in out and "return 2" not in out
    assert out.count('raise NotImplementedError("Assignment 7: write') == 2
    with pytest.raises(KeyError):
        make_student.blank_source(src, 7, ["h"])
    loop = "def k(X):\n    acc = 0\n    for i in range(3):\n        acc += i\n        acc *= 2\n    return acc\n"
    out = make_student.blank_source(loop, 4, loops=["k"])
    assert "acc += i" not in out and "        pass" in out and "return acc" in out
