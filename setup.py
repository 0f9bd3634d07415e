"""Build the optional compiled helpers: the proxy's framing walk
(millpond.proxy.protocol._scan), its compiled lane (millpond.proxy._lane, not used by
the proxy yet: docs/proxy-data-path.md) and the pool's histogram recording
(millpond.pool._histogram).

Everything else is in pyproject.toml. The extensions are optional: without a C compiler
(or Cython) millpond installs and runs on their pure-Python twins, only slower.
"""

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # building without Cython: pure Python
    extensions = []
else:
    extensions = cythonize(
        [
            Extension(
                "millpond.proxy.protocol._scan",
                ["src/millpond/proxy/protocol/_scan.pyx"],
                optional=True,
            ),
            Extension(
                "millpond.proxy._lane",
                ["src/millpond/proxy/_lane.pyx"],
                optional=True,
            ),
            Extension(
                "millpond.pool._histogram",
                ["src/millpond/pool/_histogram.pyx"],
                optional=True,
            ),
        ],
        build_dir="build/cython",
        include_path=["src"],  # the lane cimports _scan's .pxd
        quiet=True,
    )

setup(ext_modules=extensions)
