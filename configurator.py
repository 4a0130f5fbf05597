"""
The one small config mechanism of train.py and sample.py (after nanoGPT's configurator.py).

A script defines its settings as plain module globals, then calls  configure(globals(), sys.argv[1:]):
  - an argument without '--' is a config file: python code that assigns some of those settings;
  - --key=value overrides one setting; the value is read as a python literal (3, 3e-4, True, 'msa'),
    and anything that is not a literal is kept as a string (--out_dir=out-shapes).
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
    if old is not None and value is not None:
        if isinstance(old, float) and type(value) is int:
            value = float(value)  # --learning_rate=1 means 1.0
        if type(value) is not type(old):
            _fail(f"{key} expects a {type(old).__name__} (default {old!r}), got {value!r} in {where}")
    settings[key] = value


def configure(script_globals, argv):
    """Apply config files and --key=value overrides to the settings among script_globals (the names bound
    to None, bool, int, float or str that do not start with '_'). Returns the settings as a dict."""
    settings = {k: v for k, v in script_globals.items()
                if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}
    if "-h" in argv or "--help" in argv:  # the script's docstring, then every setting with its default
        print((script_globals.get("__doc__") or "").strip() + "\n\nsettings (--key=value):")
        print("\n".join(f"  {k} = {v!r}" for k, v in settings.items()))
        raise SystemExit(0)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                _fail(f"expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            _set(settings, key, value, "the command line")
        else:
            if not os.path.isfile(arg):
                _fail(f"config file {arg!r} not found (arguments are config files or --key=value)")
            file_vars = {}
            exec(open(arg).read(), {}, file_vars)
            for key, value in file_vars.items():
                if not key.startswith("_"):
                    _set(settings, key, value, arg)
    script_globals.update(settings)
    return settings
