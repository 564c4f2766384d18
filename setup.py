"""Metadata lives in setup.cfg; this file only declares the C accelerator.

`vdsmlite.ovf._tarscan` is the OVF_STORE upload's hot loop in C. It is optional:
where it cannot be built, `tarstream` runs the same checks in Python (slower,
holding the GIL); `vdsmlite.ovf.tarstream.ACCELERATED` says which one runs.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("vdsmlite.ovf._tarscan", ["vdsmlite/ovf/_tarscan.c"],
                             extra_compile_args=["-O2", "-Wall", "-Werror"],
                             optional=True)])
