"""Metadata lives in setup.cfg; this file only declares the C accelerator.

The OVF_STORE upload's two hot loops in C: `vdsmlite.ovf._tarscan` (the archive's
member checks) and `vdsmlite.http._chunked` (a chunked body's common case). Both
are optional: where they cannot be built, the same work runs in Python (slower,
holding the GIL); `vdsmlite.ovf.tarstream.ACCELERATED` and
`vdsmlite.http.wire.ACCELERATED` say which runs.
"""

from setuptools import Extension, setup


def accelerator(name: str, source: str) -> Extension:
    return Extension(name, [source], extra_compile_args=["-O2", "-Wall", "-Werror"],
                     optional=True)


setup(ext_modules=[accelerator("vdsmlite.ovf._tarscan", "vdsmlite/ovf/_tarscan.c"),
                   accelerator("vdsmlite.http._chunked", "vdsmlite/http/_chunked.c")])
