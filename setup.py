"""Build hook for the one optional C extension (engine._fastio: sendmmsg/recvmmsg batches).

Everything else is declared in pyproject.toml.  The extension is optional: without a C
compiler the install still succeeds and engine/send.py, intercept/nfqueue.py fall back to
ctypes (then to per-packet socket calls), logging once which path they use.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engine._fastio",
            sources=["engine/_fastio.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
