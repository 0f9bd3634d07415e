"""Build the optional compiled framing walk (millpond.proxy.protocol._scan).

Everything else is in pyproject.toml. The extension is optional: without a C compiler
(or Cython) millpond installs and runs on its pure-Python framing, only slower.
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
            )
        ],
        build_dir="build/cython",
        quiet=True,
    )

setup(ext_modules=extensions)
