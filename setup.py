"""Build the Cython twins in pyx/ as extension modules inside the packages.

Without a working compiler (or with FASTSNI_NO_EXTENSIONS=1 at build time) the
package still installs, and the pure-Python twins run instead.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSIONS = {
    "fastsni._tls": "pyx/_tls.pyx",
    "fastsni._addresses": "pyx/_addresses.pyx",
    "fastsni._engine": "pyx/_engine.pyx",
    "fastsni._proxy": "pyx/_proxy.pyx",
    "fasthttpdir._http": "pyx/_http.pyx",
}


class OptionalBuildExt(build_ext):
    """Build each extension if possible; a failure leaves the pure twin in charge."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            print(f"fastsni: not building extensions ({exc}); the pure twins will run", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"fastsni: could not build {ext.name} ({exc}); its pure twin will run", file=sys.stderr)


def extensions():
    if os.environ.get("FASTSNI_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    from setuptools import Extension

    built = []
    for name, source in EXTENSIONS.items():
        try:  # one at a time: a Cython error costs only that module its compiled twin
            built += cythonize(
                [Extension(name, [source], extra_compile_args=["-O2"])],
                compiler_directives={"language_level": "3"},
                include_path=[ROOT],  # where `cimport fastsni._engine` finds fastsni/_engine.pxd
                quiet=True,
            )
        except Exception as exc:
            print(f"fastsni: cannot cythonize {source} ({exc}); its pure twin will run", file=sys.stderr)
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
