"""Builds the Cython kernel ``healthcode.rules._kernel`` (``src/healthcode/rules/_kernel.pyx``) and the gRPC code
from ``proto/``.

OpenMP is used when the compiler supports it; otherwise the kernel is built serially (``prange`` then runs on one
thread).  ``HEALTHCODE_DEBUG_KERNEL=1`` turns bounds checking on for a debug build.

The ``.proto`` files under ``proto/healthcode/v1/`` are compiled with grpcio-tools into
``src/healthcode/_proto/v1/`` (messages, stubs and ``.pyi`` type stubs) every time this script runs; the generated
code is never edited or committed.
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


def generate_protos() -> None:
    """Compile proto/healthcode/v1/*.proto into the package as ``healthcode._proto.v1``.

    The files are staged under ``build/protos/healthcode/_proto/v1/`` so the generated imports name the package's
    own module path (``healthcode._proto.v1``) rather than a top-level ``healthcode.v1``.
    """
    from grpc_tools import protoc

    root = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(root, "proto", "healthcode", "v1")
    stage_root = os.path.join(root, "build", "protos")
    stage = os.path.join(stage_root, "healthcode", "_proto", "v1")
    out = os.path.join(root, "src")
    os.makedirs(stage, exist_ok=True)
    protos = sorted(f for f in os.listdir(source) if f.endswith(".proto"))
    for name in protos:
        shutil.copyfile(os.path.join(source, name), os.path.join(stage, name))
    package = os.path.join(out, "healthcode", "_proto")
    for folder in (package, os.path.join(package, "v1")):
        os.makedirs(folder, exist_ok=True)
        init = os.path.join(folder, "__init__.py")
        if not os.path.exists(init):
            with open(init, "w") as f:
                f.write('"""Generated from proto/ by setup.py (grpcio-tools); do not edit."""\n')
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{stage_root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(os.path.join(stage, name) for name in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(protos)}")


generate_protos()

debug = bool(os.environ.get("HEALTHCODE_DEBUG_KERNEL"))
openmp = sys.platform != "win32" and _has_openmp()
compile_args = ["-O3"] + (["-fopenmp"] if openmp else [])
link_args = ["-fopenmp"] if openmp else []

extensions = [
    Extension(
        "healthcode.rules._kernel",
        ["src/healthcode/rules/_kernel.pyx"],  # includes rowform.pxi beside it
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
