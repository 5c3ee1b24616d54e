"""Build the optional fused CPU kernels (mergekit_lite/engine/_kernels.c); metadata lives in setup.cfg.

`optional=True`: without a C compiler the install still succeeds and the engine uses its torch path,
which gives the same bytes, only slower (`merge run --dry-run` says which one runs).
"""

import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]

SHARED = ["mergekit_lite/engine/_bfloat16.h"]  # included by both: a change rebuilds both

setup(ext_modules=[Extension("mergekit_lite.engine._kernels", ["mergekit_lite/engine/_kernels.c"], extra_compile_args=FLAGS,
                             depends=SHARED, optional=True),
             Extension("mergekit_lite.engine._saved_kernels", ["mergekit_lite/engine/_saved_kernels.c"],
                       extra_compile_args=FLAGS, depends=SHARED, optional=True)])
