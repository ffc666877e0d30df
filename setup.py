"""Build hook for the C extensions; everything else is declared in pyproject.toml.

- engine.io._fastio (sendmmsg/recvmmsg batches, plain C).  Without a C compiler the install
  still succeeds and engine/io/send.py, intercept/sources/nfqueue.py fall back to ctypes (then to
  per-packet socket calls), logging once which path they use.
- engine/dataplane/*.pyx (the compiled data plane, Cython 3: a build requirement in
  pyproject.toml, so pip brings it).  Also optional: where no compiler (or no Python
  headers) is found, pip still installs tcpcopy-mp, ``engine.dataplane.AVAILABLE`` is False
  with the reason in ``engine.dataplane.UNAVAILABLE``, and the pure-Python engine runs.
  TCPCOPY_MP_REQUIRE_DATAPLANE=1 turns a failed build into a failed install.
"""

import os
from pathlib import Path

from setuptools import Extension, setup

REQUIRED = os.environ.get("TCPCOPY_MP_REQUIRE_DATAPLANE") == "1"


def dataplane_extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRED:
            raise
        print("setup: Cython not found: engine.dataplane is not built (pure-Python engine)")
        return []
    sources = sorted(str(p) for p in Path("engine/dataplane").glob("*.pyx"))
    extensions = [
        Extension(
            src[:-4].replace("/", "."),
            sources=[src],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        )
        for src in sources
    ]
    built = cythonize(extensions, compiler_directives={"language_level": 3})
    for ext in built:
        ext.optional = not REQUIRED  # cythonize returns new Extensions without the flag
    return built


setup(
    ext_modules=[
        Extension(
            "engine.io._fastio",
            sources=["engine/io/_fastio.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        *dataplane_extensions(),
    ]
)
