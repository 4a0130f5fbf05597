"""
Build the course kit from the repository: one folder per assignment, holding the handout, the files the
student works in (with the parts to write removed), and the tests that grade them.

  python course/make_student.py --out DIR              # the students' version: DIR/assignment_1 ... _6
  python course/make_student.py --out DIR --solution   # the same folders with nothing removed (instructors, CI)

Grading an assignment:  cd DIR/assignment_N && python -m pytest

The student files are generated from the repository's current code, never from hand-made copies, so a
handout cannot drift from the code it teaches. Per assignment (ASSIGNMENTS below):
  - files: repository files copied into the folder, with, transitively, the repository modules that a
    copied Python file imports at top level;
  - extract: {student file: {repository file: [top-level names]}}: one small file made of just these
    definitions (found with Python's ast), the imports they use and nothing else; it may import only
    msa_ref, msa_checks and outside packages (torch, triton, ...), so a name it needs from another repository module
    must be listed too. A missing name, or a name used but neither listed nor imported, is an error;
  - blank: whole function bodies, found with ast by (qualified) name: the signature and docstring stay,
    the body becomes  raise NotImplementedError("Assignment N: ...");
  - loops: for a Triton kernel (which cannot raise), the body of the kernel's main loop, replaced by
    `pass`, so the kernel runs and gives a wrong answer until the student writes the loop;
  - complete: the other assignments whose functions this folder keeps whole (it cannot run without them).
No folder holds another assignment's answer: every function that any assignment blanks (or whose loop it
empties) is blanked in every other folder too, wherever it is defined, unless that folder lists the
assignment in `complete`.
"""
import argparse
import ast
import builtins
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
COURSE = os.path.join(ROOT, "course")
IMPORTABLE = ("msa_ref", "msa_checks")  # the only repository modules an extracted file may import

# files: repository paths copied into the folder (by base name; config/ files keep their folder)
# extract: {student file: {repository file: [top-level names]}}, in the order they are written out
# blank: {base name: [function names to empty]}, loops: {base name: [Triton kernels whose main loop is emptied]}
# complete: assignments whose blanked functions this folder keeps whole
ASSIGNMENTS = {
    1: dict(title="block scores and top-k selection", files=["msa_ref.py", "DESIGN.md"],
            blank={"msa_ref.py": ["block_scores", "select_blocks"]}),
    2: dict(title="exact sparse attention with an online softmax", files=["msa_ref.py", "course/solutions/online_softmax.py"],
            blank={"online_softmax.py": ["sparse_attention_online"]}),
    3: dict(title="the KL alignment loss", files=["msa_ref.py", "DESIGN.md"], blank={"msa_ref.py": ["kl_loss"]}),
    4: dict(title="the inner loop of a Triton kernel", files=["DESIGN.md", "msa_ref.py"],
            extract={"query_forward.py": {
                "msa_triton/common.py": ["LOG2E", "LN2", "LN2_K", "LIST_TILE", "LIST_PROGRAMS", "_pow2", "_cdiv", "_prec",
                                         "_strides", "_kernel_limits", "_check_attention", "_softmax_rescale",
                                         "_softmax_finish", "_slot_rows", "_slots_kernel", "_list_tiles", "_slots"],
                "msa_triton/attention.py": ["_fwd_query_kernel", "attention_forward_query_outer", "_consts"]}},
            loops={"query_forward.py": ["_fwd_query_kernel"]}),
    5: dict(title="the MoE router and its load balancing", files=["moe.py", "model.py"],
            blank={"moe.py": ["moe_dispatch", "MoE.forward"]}),
    # the experiment trains the model, which needs the selection (1), the KL loss (3) and the MoE layer (5):
    # this folder holds their answers, so it is handed out after those assignments are graded
    6: dict(title="experiment: K and block size", files=["course/experiment.py", "train.py", "config/train_cpu.py", "DESIGN.md"],
            blank={"experiment.py": ["indexer_recall"]}, complete=(1, 3, 5)),
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


def _body_after_docstring(node):
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]  # keep the docstring: it is the specification
    return body


def blank_source(src, n, functions=(), loops=(), foreign=None):
    """Return src with the bodies of `functions` (after their docstring) replaced by a NotImplementedError and
    the first for-loop body of each kernel in `loops` replaced by `pass`: assignment n's work. Raises KeyError
    for a missing name, so a renamed function in the repository breaks the generator (and CI) instead of a
    silent handout. foreign: {name: (m, "blank" | "loop")}, other assignments' work, emptied the same way
    wherever src defines it (and ignored where it does not)."""
    tree = ast.parse(src)
    defs = _functions(tree)
    lines = src.splitlines()
    work = [(name, n, "blank") for name in functions] + [(name, n, "loop") for name in loops]
    work += [(name, m, kind) for name, (m, kind) in (foreign or {}).items() if name in defs]
    cuts = []  # (first line, last line, replacement lines), 1-based inclusive
    for name, m, kind in work:
        if name not in defs:
            raise KeyError(f"assignment {n}: no function {name} to blank (renamed in the repository? see ASSIGNMENTS)")
        if kind == "blank":
            body = _body_after_docstring(defs[name])
            if not body:
                raise KeyError(f"{name} has nothing but a docstring to blank")
            msg = f"Assignment {m}: write {name} (see README.md)" if m == n else f"{name} is assignment {m}'s work, not this one's"
            new = [f'{_indent(lines, body[0])}raise NotImplementedError("{msg}")']
        else:
            loop = next((s for s in defs[name].body if isinstance(s, ast.For)), None)
            if loop is None:
                raise KeyError(f"{name} has no for loop to empty")
            body = loop.body
            what = "the body of this loop is yours to write (see README.md)" if m == n else f"this loop is assignment {m}'s work"
            new = [f"{_indent(lines, body[0])}# Assignment {m}: {what}", f"{_indent(lines, body[0])}pass"]
        cuts.append((body[0].lineno, body[-1].end_lineno, new))
    for first, last, new in sorted(cuts, reverse=True):  # bottom up: earlier line numbers stay valid
        lines[first - 1:last] = new
    out = "\n".join(lines) + "\n"
    ast.parse(out)  # the student file must at least be valid Python
    return out


def _is_local(module, level):
    """Is an import of `module` one of the repository's own modules (or a relative import)?"""
    top = (module or "").split(".")[0]
    return level > 0 or os.path.isfile(os.path.join(ROOT, f"{top}.py")) or os.path.isdir(os.path.join(ROOT, top))


def _free_names(node):
    """Names a top-level definition reads but does not bind itself (arguments, assignments, loop targets...)."""
    used, bound = set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            (used if isinstance(sub.ctx, ast.Load) else bound).add(sub.id)
        elif isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)) and sub is not node:
            bound.add(sub.name)
    return used - bound


def extract(sources, title="Assignment"):
    """One self-contained Python file made of the named top-level definitions of repository files.
    sources: {repository path: [names]} (functions, classes, constants), written in that order, each file's
    definitions in their order in the file, preceded by the imports they use. Imports of repository modules
    other than IMPORTABLE are dropped: what the definitions need from them must be named in sources.
    Raises KeyError for a name a file does not define and for a name used but neither extracted nor imported."""
    pieces, defined, imports, needed = [], set(), {}, set()
    for rel, names in sources.items():
        src = open(os.path.join(ROOT, rel)).read()
        tree, lines = ast.parse(src), src.splitlines()
        top = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                top[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name):
                        top[t.id] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    bound = a.asname or (a.name.split(".")[0] if isinstance(node, ast.Import) else a.name)
                    imports.setdefault(bound, (node, a))
        missing = [name for name in names if name not in top]
        if missing:
            raise KeyError(f"{rel} defines no top-level {', '.join(missing)} (see ASSIGNMENTS in course/make_student.py)")
        for node in sorted({id(top[name]): top[name] for name in names}.values(), key=lambda x: x.lineno):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            pieces.append((isinstance(node, (ast.Assign, ast.AnnAssign)), "\n".join(lines[first - 1:node.end_lineno])))
            needed |= _free_names(node)
        defined |= set(names)
    used_imports, unknown = [], []
    for name in sorted(needed - defined - set(dir(builtins))):
        node, alias = imports.get(name, (None, None))
        module = None if node is None else node.module if isinstance(node, ast.ImportFrom) else alias.name
        level = getattr(node, "level", 0)
        if node is None or (_is_local(module, level) and (level > 0 or module.split(".")[0] not in IMPORTABLE)):
            unknown.append(name)
        else:
            used_imports.append((node, alias))
    if unknown:
        raise KeyError(f"{', '.join(unknown)}: used by {', '.join(n for ns in sources.values() for n in ns)} but neither "
                       f"extracted nor imported from msa_ref, msa_checks or a package: name {'it' if len(unknown) == 1 else 'them'} "
                       f"in ASSIGNMENTS (course/make_student.py)")
    head = []  # the imports, in the order of the source files, one statement per source statement
    for node in sorted({id(nd): nd for nd, _ in used_imports}.values(), key=lambda x: (x.lineno, x.col_offset)):
        aliases = [a for nd, a in used_imports if nd is node]
        stmt = ast.ImportFrom(node.module, aliases, node.level) if isinstance(node, ast.ImportFrom) else ast.Import(aliases)
        head.append(ast.unparse(stmt))
    group = lambda h: 0 if h.split()[1].split(".")[0] in sys.stdlib_module_names else 2 if h.split()[1] in IMPORTABLE else 1
    blocks = ["\n".join(sorted((h for h in head if group(h) == i), key=lambda h: (h.startswith("from"), h))) for i in range(3)]
    doc = (f'"""\n{title}: {", ".join(n for ns in sources.values() for n in ns)},\n'
           f'taken unchanged from the repository ({", ".join(sources)}) by course/make_student.py.\n"""')
    body = ""
    for i, (is_const, text) in enumerate(pieces):
        sep = "\n" if i and is_const and pieces[i - 1][0] else "\n\n\n"
        body += (sep if i else "") + text
    out = "\n\n".join(p for p in [doc, *blocks] if p) + "\n\n" + body + "\n"
    ast.parse(out)
    return out


def _local_imports(text):
    """Repository modules imported at the top level of the Python source text (not inside functions)."""
    names = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return [f"{m}.py" for m in sorted(names) if os.path.isfile(os.path.join(ROOT, f"{m}.py"))]


def foreign_work(n):
    """{name: (m, "blank" | "loop")}: what the other assignments write, to be emptied in assignment n's folder."""
    keep = set(ASSIGNMENTS[n].get("complete", ())) | {n}
    found = {}
    for m, spec in ASSIGNMENTS.items():
        if m not in keep:
            for kind, key in (("blank", "blank"), ("loop", "loops")):
                for names in spec.get(key, {}).values():
                    found.update({name: (m, kind) for name in names})
    return found


def build(n, out_dir, solution):
    """Write DIR/assignment_n: README.md (the handout), the code files, the tests and their conftest.py."""
    spec = ASSIGNMENTS[n]
    dst = os.path.join(out_dir, f"assignment_{n}")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    texts = {name: extract(sources, f"Assignment {n}'s code") for name, sources in spec.get("extract", {}).items()}
    todo, done = list(spec.get("files", [])), set()
    for text in texts.values():
        todo += _local_imports(text)
    while todo:  # the listed files and, transitively, the repository modules they import
        rel = todo.pop(0)
        if rel not in done:
            done.add(rel)
            texts[rel if rel.startswith("config/") else os.path.basename(rel)] = text = open(os.path.join(ROOT, rel)).read()
            if rel.endswith(".py"):
                todo += _local_imports(text)
    foreign = foreign_work(n)
    for name, text in texts.items():
        if name.endswith(".py") and not solution:
            base = os.path.basename(name)
            text = blank_source(text, n, spec.get("blank", {}).get(base, ()), spec.get("loops", {}).get(base, ()), foreign)
        target = os.path.join(dst, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(text)
    for key in ("blank", "loops"):  # a name listed for a file that the folder does not hold is a mistake
        for base in spec.get(key, {}):
            if base not in {os.path.basename(t) for t in texts}:
                raise KeyError(f"assignment {n}: {key} names {base}, which its folder does not hold")
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
