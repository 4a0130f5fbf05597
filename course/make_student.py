"""
Build the course kit from the repository: one folder per assignment, holding the handout, the files the
student works in (with the parts to write removed), and the tests that grade them.

  python course/make_student.py --out DIR              # the students' version: DIR/assignment_1 ... _6
  python course/make_student.py --out DIR --solution   # the same folders with nothing removed (instructors, CI)

Grading an assignment:  cd DIR/assignment_N && python -m pytest

The student files are generated from the repository's current code, never from hand-made copies, so a
handout cannot drift from the code it teaches. What is removed, per assignment (ASSIGNMENTS below):
  - whole function bodies, found with Python's ast by (qualified) name: the signature and docstring stay,
    the body becomes  raise NotImplementedError("Assignment N: ...");
  - for a Triton kernel (which cannot raise), the body of the kernel's main loop, replaced by `pass`,
    so the kernel runs and gives a wrong answer until the student writes the loop.
Every local module that a copied file imports at top level is copied too (unchanged).
"""
import argparse
import ast
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
COURSE = os.path.join(ROOT, "course")

# files: repository paths copied into the assignment folder (by base name; config/ files keep their folder)
# blank: {base name: [function names to empty]}, loops: {base name: [Triton kernels whose main loop is emptied]}
ASSIGNMENTS = {
    1: dict(title="block scores and top-k selection", files=["msa_ref.py"],
            blank={"msa_ref.py": ["block_scores", "select_blocks"]}),
    2: dict(title="exact sparse attention with an online softmax", files=["msa_ref.py", "course/solutions/online_softmax.py"],
            blank={"online_softmax.py": ["sparse_attention_online"]}),
    3: dict(title="the KL alignment loss", files=["msa_ref.py"], blank={"msa_ref.py": ["kl_loss"]}),
    4: dict(title="the inner loop of a Triton kernel", files=["msa_triton.py"],
            loops={"msa_triton.py": ["_fwd_query_kernel"]}),
    5: dict(title="the MoE router and its load balancing", files=["model.py"],
            blank={"model.py": ["moe_dispatch", "MoE.forward"]}),
    6: dict(title="experiment: K and block size", files=["course/experiment.py", "train.py", "config/train_cpu.py"],
            blank={"experiment.py": ["indexer_recall"]}),
}


def _functions(tree):
    """{qualified name: FunctionDef} for module-level functions and methods of module-level classes."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return found


def _indent(lines, node):
    line = lines[node.lineno - 1]
    return line[:len(line) - len(line.lstrip())]


def blank_source(src, n, functions=(), loops=()):
    """Return src with the bodies of `functions` (after their docstring) replaced by a NotImplementedError and
    the first for-loop body of each kernel in `loops` replaced by `pass`. Raises KeyError for a missing name,
    so a renamed function in the repository breaks the generator (and CI) instead of a silent handout."""
    tree = ast.parse(src)
    defs = _functions(tree)
    lines = src.splitlines()
    cuts = []  # (first line, last line, replacement lines), 1-based inclusive
    for name in functions:
        body = defs[name].body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body = body[1:]  # keep the docstring: it is the specification
        if not body:
            raise KeyError(f"{name} has nothing but a docstring to blank")
        ind = _indent(lines, body[0])
        cuts.append((body[0].lineno, body[-1].end_lineno,
                     [f'{ind}raise NotImplementedError("Assignment {n}: write {name} (see README.md)")']))
    for name in loops:
        loop = next(s for s in defs[name].body if isinstance(s, ast.For))
        ind = _indent(lines, loop.body[0])
        cuts.append((loop.body[0].lineno, loop.body[-1].end_lineno,
                     [f"{ind}# Assignment {n}: the body of this loop is yours to write (see README.md)", f"{ind}pass"]))
    for first, last, new in sorted(cuts, reverse=True):  # bottom up: earlier line numbers stay valid
        lines[first - 1:last] = new
    out = "\n".join(lines) + "\n"
    ast.parse(out)  # the student file must at least be valid Python
    return out


def _local_imports(path):
    """Repository modules imported at the top level of the file at path (not inside functions)."""
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return [f"{m}.py" for m in sorted(names) if os.path.isfile(os.path.join(ROOT, f"{m}.py"))]


def build(n, out_dir, solution):
    """Write DIR/assignment_n: README.md (the handout), the code files, the tests and their conftest.py."""
    spec = ASSIGNMENTS[n]
    dst = os.path.join(out_dir, f"assignment_{n}")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    todo, done = list(spec["files"]), set()
    while todo:  # the listed files and, transitively, the repository modules they import
        rel = todo.pop(0)
        if rel in done:
            continue
        done.add(rel)
        src_path = os.path.join(ROOT, rel)
        name = os.path.basename(rel)
        target = os.path.join(dst, rel if rel.startswith("config/") else name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        text = open(src_path).read()
        if not solution and (name in spec.get("blank", {}) or name in spec.get("loops", {})):
            text = blank_source(text, n, spec.get("blank", {}).get(name, ()), spec.get("loops", {}).get(name, ()))
        with open(target, "w") as f:
            f.write(text)
        if rel.endswith(".py"):
            todo += _local_imports(src_path)
    shutil.copy(os.path.join(COURSE, f"assignment_{n}.md"), os.path.join(dst, "README.md"))
    shutil.copy(os.path.join(COURSE, "tests", "conftest.py"), dst)
    shutil.copy(os.path.join(COURSE, "tests", f"test_assignment_{n}.py"), dst)
    sample = os.path.join(COURSE, "solutions", f"assignment_{n}")
    if solution and os.path.isdir(sample):  # what a student hands in besides code: a measured sample submission
        shutil.copytree(sample, dst, dirs_exist_ok=True)
    return dst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write assignment_1 ... assignment_6 into")
    p.add_argument("--solution", action="store_true", help="copy the code unchanged (the reference kit)")
    p.add_argument("--only", type=int, nargs="*", choices=sorted(ASSIGNMENTS), help="build only these assignments")
    args = p.parse_args(argv)
    if os.path.realpath(args.out) == ROOT:
        sys.exit("--out must not be the repository itself")
    for n in args.only or sorted(ASSIGNMENTS):
        print(f"assignment {n} ({ASSIGNMENTS[n]['title']}): {build(n, args.out, args.solution)}")


if __name__ == "__main__":
    main()
