"""
The one small config mechanism of train.py and sample.py (after nanoGPT's configurator.py).

A script defines its settings as plain module globals, then calls  configure(globals(), sys.argv[1:]):
  - an argument without '--' is a config file: lines `name = <python literal>` and comments, read with ast
    (no file we read runs code: a call, an import or any other statement is refused with its line);
  - --key=value overrides one setting; the value is read as a python literal (3, 3e-4, True, 'msa'),
    and anything that is not a literal is kept as a string (--out_dir=out-shapes). Files apply first, in their
    order, then the overrides, wherever they stand on the command line.
An unknown key, in a file or on the command line, or a value of the wrong type, stops the script with
a message that says what was expected. -h / --help lists the settings and their defaults.
"""
import ast
import os


def _fail(msg):
    raise SystemExit(f"config error: {msg}")


def _set(settings, key, value, where):
    if key not in settings:
        near = [k for k in settings if key in k or k in key]
        _fail(f"unknown key {key!r} in {where}" + (f" (did you mean {', '.join(near)}?)" if near else "")
              + f"; known keys: {', '.join(sorted(settings))}")
    old = settings[key]
    if old is not None:  # a setting whose default is None takes any value; the others keep their type
        if isinstance(old, float) and type(value) is int:
            value = float(value)  # --learning_rate=1 means 1.0
        if type(value) is not type(old):
            kind = type(old).__name__
            kind = ("an " if kind[0] in "aeiou" else "a ") + kind                    # an int, a float
            _fail(f"{key} expects {kind} (default {old!r}), got {value!r} in {where}")
    settings[key] = value


def read_config_file(path):
    """A config file -> {name: value}, in file order. Each statement must be `name = <literal>` (a number, string,
    bool, None, or a tuple/list/dict of them): the file is parsed with ast, never executed."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
    except (SyntaxError, UnicodeDecodeError) as e:
        where = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
        _fail(f"{path}{where}: expected lines `name = <literal>` and comments, got text that is not Python "
              f"({e.msg if isinstance(e, SyntaxError) else e.reason})")
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
                continue
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                pass  # not a literal: refused below
        text = (ast.get_source_segment(source, node) or "").splitlines()[0]
        text = text if len(text) <= 80 else text[:77] + "..."
        _fail(f"{path} line {node.lineno}: expected `name = <literal>` (a number, string, bool or None; config "
              f"files are read, not run), got `{text}`")
    return found


def configure(script_globals, argv):
    """Apply config files and --key=value overrides to the settings among script_globals (the names bound
    to None, bool, int, float or str that do not start with '_'). Returns the settings as a dict."""
    settings = {k: v for k, v in script_globals.items()
                if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}
    if "-h" in argv or "--help" in argv:  # the script's docstring, then every setting with its default
        print((script_globals.get("__doc__") or "").strip() + "\n\nsettings (--key=value):")
        print("\n".join(f"  {k} = {v!r}" for k, v in settings.items()))
        raise SystemExit(0)
    for arg in [a for a in argv if not a.startswith("--")]:  # the files first, in order: an override always wins
        if not os.path.isfile(arg):
            _fail(f"config file {arg!r} not found (arguments are config files or --key=value)")
        for key, value in read_config_file(arg).items():
            _set(settings, key, value, arg)
    for arg in [a for a in argv if a.startswith("--")]:
        key, eq, text = arg[2:].partition("=")
        if not eq:
            _fail(f"expected --key=value, got {arg!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        _set(settings, key, value, "the command line")
    script_globals.update(settings)
    return settings
