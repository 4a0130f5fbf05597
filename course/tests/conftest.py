"""
Test setup of every assignment folder (course/make_student.py copies this file next to the tests).
pytest puts the folder holding this file first on sys.path, so `import msa_ref` (etc.) imports the copy
in the assignment folder: the student's code. Without a CUDA GPU, Triton must run in its interpreter,
and the variable is read when triton is imported, so it is set here, before any test imports it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
