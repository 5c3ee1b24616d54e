"""Build the optional fused CPU kernels (engine/_kernels.c and _saved_kernels.c); metadata lives in setup.cfg.

`optional=True`: without a C compiler the install still succeeds and the engine uses its torch path,
which gives the same bytes, only slower (`merge run --dry-run` says which one runs).
"""

import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]

# one library, two sources: the engine's kernels and the saved-tensor (full fine-tune) kernels; both include _rows.h
SOURCES = ["mergekit_lite/engine/_kernels.c", "mergekit_lite/engine/_saved_kernels.c"]

setup(ext_modules=[Extension("mergekit_lite.engine._kernels", SOURCES, depends=["mergekit_lite/engine/_rows.h"],
                             extra_compile_args=FLAGS, optional=True)])
