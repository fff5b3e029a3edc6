"""Builds the simulator's hot path as C extensions (Cython's pure-Python mode).

Each listed module stays a plain .py file, valid and complete on its own; the .pxd beside it
only adds C types. `pip install -e .` compiles them in place; without a compiler or Cython the
package still works, uncompiled (sim/compiled.py says which is in use).
"""

from Cython.Build import cythonize
from setuptools import setup

# the modules compiled, in dependency order (router.pxd cimports the others)
COMPILED = ["sim/engine.py", "sim/replica.py", "sim/router.py"]

extensions = cythonize(
    COMPILED,
    compiler_directives={
        "language_level": 3,
        # types come from the .pxd files only: the .py annotations describe Python objects
        "annotation_typing": False,
    },
    # Python's semantics kept whole (bounds checks, negative indices, ZeroDivisionError): the
    # compiled run must give the same results as the source, bit for bit
)
for ext in extensions:
    ext.optional = True  # no C compiler: the install goes on, the simulator runs its source

setup(ext_modules=extensions)
