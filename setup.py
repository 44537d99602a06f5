"""Build the optional C speedups; metadata lives in setup.cfg.

Without a compiler the build of ``sfmon._speedups`` fails quietly (``optional``) and
sfmon runs its pure-Python path, with the same behaviour.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sfmon._speedups",
            ["sfmon/_speedups.c"],
            optional=True,
            extra_compile_args=[] if sys.platform == "win32" else ["-O2", "-Wall"],
        )
    ]
)
