"""Builds the Cython kernel ``healthcode._kernel`` from ``ext/``.

OpenMP is used when the compiler supports it; otherwise the kernel is built serially (``prange`` then runs on one
thread).  ``HEALTHCODE_DEBUG_KERNEL=1`` turns bounds checking on for a debug build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _has_openmp() -> bool:
    """Try to compile and link a tiny OpenMP program with the compiler setuptools will use."""
    if os.environ.get("HEALTHCODE_NO_OPENMP"):
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as f:
            f.write(src)
        result = subprocess.run(
            [cc, "-fopenmp", path, "-o", os.path.join(tmp, "t")], capture_output=True, check=False
        )
        return result.returncode == 0


debug = bool(os.environ.get("HEALTHCODE_DEBUG_KERNEL"))
openmp = sys.platform != "win32" and _has_openmp()
compile_args = ["-O3"] + (["-fopenmp"] if openmp else [])
link_args = ["-fopenmp"] if openmp else []

extensions = [
    Extension(
        "healthcode._kernel",
        ["ext/_kernel.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": debug,
            "embedsignature": True,
        },
        compile_time_env={"HAVE_OPENMP": openmp},
    ),
)
