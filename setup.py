"""Build script. The pure-Python package always installs; the compiled extension is optional.

The C++/CUDA extension fdm_fast._C lands in a later step; until then this file only declares the
package so that `pip install .` works on machines without a compiler or CUDA.
"""

from setuptools import setup

setup()
