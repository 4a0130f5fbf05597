"""
The course kit (course/): every assignment's student version is generated from the repository's current
code, its tests all fail before the student's work is done, and they all pass against the repository's own
code (the kit generated with --solution). The folders are graded by course/grade.py, as a student's
`cd assignment_N && python -m pytest` would, one process per kit (torch imported once), both kits at once.
"""
import ast
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
def kits(tmp_path_factory):
    """{'student' | 'solution': folder holding assignment_1 ... assignment_N}"""
    kits = {kind: str(tmp_path_factory.mktemp(kind)) for kind in ("student", "solution")}
    for kind, out in kits.items():
        for n in ASSIGNMENTS:
            make_student.build(n, out, solution=kind == "solution")
    return kits


@pytest.fixture(scope="module")
def outcomes(kits, tmp_path_factory):
    """{('student' | 'solution', n): {test id: outcome}} for every assignment, and the folder that assignment 6's
    experiment wrote its --quick smoke run into (its output itself is graded from the measured sample run
    that the reference kit holds, course/solutions/assignment_6)."""
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


def definitions(folder):
    """{qualified name: [FunctionDef, ...]} over every .py file of an assignment folder."""
    found = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    for qual, node in make_student._functions(ast.parse(f.read())).items():
                        found.setdefault(qual, []).append(node)
    return found


def work(node, kind):
    """What an assignment writes in a definition: the body after the docstring, or the kernel's first loop body."""
    body = make_student._body_after_docstring(node) if kind == "blank" else next(s for s in node.body if isinstance(s, ast.For)).body
    return ast.dump(ast.Module(body, []))


def test_no_folder_holds_another_assignments_answer(kits):
    """Each name that assignment m blanks (or whose loop it empties) is, in every other student folder that does not
    list m in `complete`, either absent or emptied: never the repository's body. The real bodies come from m's
    reference folder; a folder's own work is checked by its failing tests."""
    real = {}
    for m in ASSIGNMENTS:
        defs = definitions(os.path.join(kits["solution"], f"assignment_{m}"))
        spec = make_student.ASSIGNMENTS[m]
        for kind, key in (("blank", "blank"), ("loop", "loops")):
            for names in spec.get(key, {}).values():
                real.update({(m, name): (kind, work(defs[name][0], kind)) for name in names})
    for n in ASSIGNMENTS:
        folder = os.path.join(kits["student"], f"assignment_{n}")
        defs = definitions(folder)
        keep = set(make_student.ASSIGNMENTS[n].get("complete", ())) | {n}
        for (m, name), (kind, body) in real.items():
            if m not in keep:
                for node in defs.get(name, []):
                    assert work(node, kind) != body, f"assignment {n}'s folder holds {name}, assignment {m}'s answer"


def test_assignment_4_folder_is_small_and_self_contained(kits):
    """The loop's folder holds the query-outer kernel, its launcher and their helpers in one file that imports no
    kernel module: a few hundred lines, not the repository's kernels."""
    folder = os.path.join(kits["student"], "assignment_4")
    py = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert py == ["conftest.py", "msa_checks.py", "msa_ref.py", "query_forward.py", "test_assignment_4.py"], py
    text = open(os.path.join(folder, "query_forward.py")).read()
    imported = {(getattr(node, "module", None) or node.names[0].name).split(".")[0] if not getattr(node, "level", 0) else "."
                for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.Import, ast.ImportFrom))}
    assert imported <= set(sys.stdlib_module_names) | {"torch", "triton", "msa_ref", "msa_checks"}, imported
    assert len(text.splitlines()) < 200


def test_extract_fails_loudly(tmp_path, monkeypatch):
    """A kernel package as the repository lays it out: a shared helper module and kernel modules importing it."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "common.py").write_text("C = 3\n")
    (tmp_path / "pkg" / "attention.py").write_text("import math\n\nfrom .common import C\n\nA = 2\n\n\n"
                                                  "def f(x):\n    return math.sqrt(x) * A * C\n")
    (tmp_path / "pkg" / "decode.py").write_text("from pkg.common import C\n\n\ndef g(x):\n    return x + C\n")
    monkeypatch.setattr(make_student, "ROOT", str(tmp_path))
    out = make_student.extract({"pkg/common.py": ["C"], "pkg/attention.py": ["A", "f"], "pkg/decode.py": ["g"]})
    assert "import math" in out and "common" not in out.split('"""')[2]
    namespace = {}
    exec(out, namespace)
    assert namespace["f"](4.0) == 12.0 and namespace["g"](1) == 4
    with pytest.raises(KeyError, match="missing"):
        make_student.extract({"pkg/attention.py": ["missing"]})
    with pytest.raises(KeyError, match="C"):       # used, imported from the package, not extracted
        make_student.extract({"pkg/attention.py": ["A", "f"]})
    with pytest.raises(KeyError, match="C"):
        make_student.extract({"pkg/decode.py": ["g"]})


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
    out = make_student.blank_source(src, 7, foreign={"g": (2, "blank"), "h": (3, "blank")})   # h: not here, ignored
    assert "return 2" not in out and "assignment 2's work" in out and "a + 1" in out
    loop = "def k(X):\n    acc = 0\n    for i in range(3):\n        acc += i\n        acc *= 2\n    return acc\n"
    out = make_student.blank_source(loop, 4, loops=["k"])
    assert "acc += i" not in out and "        pass" in out and "return acc" in out
