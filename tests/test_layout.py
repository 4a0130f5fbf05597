"""
The shape of the code, read with ast (nothing is imported or run):
  - msa_triton/ is a star: each kernel module imports, from this repository, only msa_triton.common,
    msa_checks and msa_ref (anywhere in the file: a lazy import inside a function counts too); common.py
    imports no sibling; only __init__.py, the facade, imports the kernel modules;
  - no import cycle among the repository's modules (imports at module level).
The checks are plain functions over {module name: source}, so the last tests can show that they catch
what they are meant to catch.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "msa_triton"


def repo_sources():
    """{module name: source} of the repository's top-level modules and of the msa_triton package."""
    src = {p.stem: p.read_text() for p in ROOT.glob("*.py")}
    for p in (ROOT / PACKAGE).glob("*.py"):
        src[PACKAGE if p.stem == "__init__" else f"{PACKAGE}.{p.stem}"] = p.read_text()
    return src


def imports(name, source, modules, top_level_only=False):
    """The modules of `modules` that module `name` imports, as (imported module, line) pairs. Relative imports
    are resolved against the package; `from pkg import sub` counts as importing pkg.sub when that is a module."""
    tree = ast.parse(source)
    if top_level_only:                                     # module level includes if / try blocks at that level
        nodes = [n for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(stmt)]
    else:
        nodes = ast.walk(tree)
    package = name if name == PACKAGE else name.rpartition(".")[0]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in targets if t in modules and t != name]
    return found


def star_violations(sources):
    """Lines that break the star: a kernel module importing anything of this repository but msa_triton.common,
    msa_checks and msa_ref, or common importing a sibling or the facade."""
    modules = set(sources)
    bad = []
    for name, src in sources.items():
        if not name.startswith(PACKAGE + "."):
            continue
        allowed = {"msa_ref", "msa_checks"} | (set() if name == f"{PACKAGE}.common" else {f"{PACKAGE}.common"})
        bad += [f"{name}:{line} imports {target}" for target, line in imports(name, src, modules)
                if target not in allowed]
    return bad


def import_cycle(sources):
    """One cycle of module-level imports among `sources` as a list of names, or None."""
    modules = set(sources)
    graph = {name: sorted({t for t, _ in imports(name, src, modules, top_level_only=True)})
             for name, src in sources.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_package_layout():
    src = repo_sources()
    kernels = {f"{PACKAGE}.{m}" for m in ("common", "attention", "index", "decode", "cross_entropy")}
    assert kernels <= set(src), f"missing modules: {sorted(kernels - set(src))}"


def test_kernel_modules_form_a_star():
    assert star_violations(repo_sources()) == []


def test_no_import_cycle():
    assert import_cycle(repo_sources()) is None


def test_facade_exports_the_api():
    tree = ast.parse(repo_sources()[PACKAGE])
    names = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    names |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}   # the facade's own dispatchers
    for f in ("index_topk", "sparse_attention", "kl_loss", "sparse_attention_kl", "sparse_decode",
              "linear_cross_entropy", "attention_forward_query_outer"):
        assert f in names, f


def test_checks_catch_a_sibling_import_and_a_cycle():
    src = repo_sources()
    att = f"{PACKAGE}.attention"
    for line in ("from .index import index_topk", "from . import decode", "import msa_triton.index",
                 "from msa_triton import cross_entropy", "import model"):
        bad = dict(src, **{att: src[att] + f"\n\ndef f():\n    {line}\n"})   # even a lazy import inside a function
        assert star_violations(bad) and star_violations(bad)[0].startswith(att), line
    bad = dict(src, **{f"{PACKAGE}.common": src[f"{PACKAGE}.common"] + "\nfrom .attention import SEG\n"})
    assert star_violations(bad)
    cyc = dict(src, msa_ref=src["msa_ref"] + "\nimport msa_triton\n")   # msa_triton -> attention -> msa_ref -> msa_triton
    assert import_cycle(cyc)
