"""Coverage instrumentation for the harnesses: imports made inside :func:`instrumented` are instrumented by atheris
when the harness runs as a fuzzer (``__main__``), and left alone when tests import it (no atheris needed).  This
module imports nothing of healthcode, so the imports it wraps are the first ones."""

from __future__ import annotations

import contextlib
import os


def instrumented(module_name: str) -> contextlib.AbstractContextManager[object]:
    if module_name != "__main__" or os.environ.get("FUZZ_NO_INSTRUMENT"):
        return contextlib.nullcontext()
    import atheris  # type: ignore[import-not-found]

    return atheris.instrument_imports(include=["healthcode"])  # type: ignore[no-any-return]
