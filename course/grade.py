"""
Grade assignment folders made by make_student.py, all in one Python process (torch is imported once, not
once per assignment: on a small machine that is most of the time), and print one line per assignment.

  python course/grade.py DIR/assignment_3                 # one student's folder
  python course/grade.py DIR/assignment_*  --json out.json   # several; per-test outcomes as JSON

Each folder is graded exactly as `cd folder && python -m pytest` would: its own copies of msa_ref.py etc.
come first on sys.path, and they are dropped from sys.modules afterwards so the next folder imports its own.
"""
import argparse
import json
import os
import sys

import pytest


class _Outcomes:
    """pytest plugin: test id -> 'passed' | 'failed' | 'skipped' (a failing setup or teardown counts as failed)."""

    def __init__(self):
        self.outcomes = {}

    def pytest_runtest_logreport(self, report):
        if report.failed or report.when == "call" or (report.when == "setup" and report.skipped):
            if self.outcomes.get(report.nodeid) != "failed":
                self.outcomes[report.nodeid] = report.outcome

    def pytest_collectreport(self, report):
        if report.failed:  # e.g. the test file cannot import the student's module
            self.outcomes[report.nodeid or "collection"] = "failed"


def grade(folder):
    """Run the tests of one assignment folder in this process -> {test id: outcome}."""
    folder = os.path.abspath(folder)
    before = set(sys.modules)
    cwd = os.getcwd()
    plugin = _Outcomes()
    sys.path.insert(0, folder)
    try:
        os.chdir(folder)  # the experiment's tests read results.json beside them, scripts may use relative paths
        pytest.main(["-q", "-p", "no:cacheprovider", f"--rootdir={folder}", folder], plugins=[plugin])
    finally:
        os.chdir(cwd)
        sys.path.remove(folder)
        for name in set(sys.modules) - before:  # the folder's own modules (msa_ref, model, conftest, tests...)
            path = getattr(sys.modules[name], "__file__", None) or ""
            if os.path.abspath(path).startswith(folder + os.sep):
                del sys.modules[name]
    return plugin.outcomes


def main():
    p = argparse.ArgumentParser(description="Grade assignment folders in one process.")
    p.add_argument("folders", nargs="+")
    p.add_argument("--json", help="write {folder: {test id: outcome}} here")
    args = p.parse_args()
    results = {f: grade(f) for f in args.folders}
    for f, res in results.items():
        n = {o: sum(v == o for v in res.values()) for o in ("passed", "failed", "skipped")}
        print(f"{f}: {n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    sys.exit(0 if all(res and "failed" not in res.values() for res in results.values()) else 1)


if __name__ == "__main__":
    main()
