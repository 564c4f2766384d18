"""OVF -> VDSM vmParams conversion (`vdsmlite.ovf.vmparams.convert`) against parsing alone.

10,000 OVFs made in memory from the real samples (tests/data/ovf-samples, every
one, in turn) with fresh VM, image and volume ids, so no two documents are the
same bytes. The peer, in the same run on the same bytes: `lxml.etree.fromstring`
with the hardened parser settings the conversion itself parses with (no entities,
no DTD, no network, comments and blank text dropped). The ratio conversion /
parse is what the conversion costs on top of reading the XML; the hosted-engine
4.2 samples also parse and re-serialise their nested EngineXml.

Target: as low as reasonably possible (the tree is walked once, by table lookups).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lxml import etree

from tests.ovf_helpers import SAMPLES
from vdsmlite.ovf import safexml
from vdsmlite.ovf.vmparams import convert

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_BLANK = "00000000-0000-0000-0000-000000000000"


def make_ovfs(count: int) -> list[bytes]:
    """`count` OVFs from the samples in turn, every UUID in each replaced consistently."""
    texts = [p.read_text() for p in sorted(SAMPLES.glob("*.ovf"))]
    out = []
    for i in range(count):
        text = texts[i % len(texts)]
        fresh: dict[str, str] = {_BLANK: _BLANK}

        def renew(m: re.Match[str], fresh: dict[str, str] = fresh) -> str:
            key = m.group(0).lower()
            if key not in fresh:
                fresh[key] = str(uuid.uuid4())
            return fresh[key]

        out.append(_UUID_RE.sub(renew, text).encode())
    return out


def timed(fn, ovfs: list[bytes], rounds: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        for data in ovfs:
            fn(data)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    ovfs = make_ovfs(args.count)
    parser = safexml._new_parser()  # the same settings the conversion parses with

    def parse(data: bytes) -> None:
        etree.fromstring(data, parser)

    def conversion(data: bytes) -> None:
        convert(data, domain_id="5d0e3e3e-6c8e-4a52-a1a3-1b6f0c9a1e01")

    # Warm both up and check every document converts.
    for data in ovfs[:50]:
        parse(data)
        conversion(data)
    parsed = timed(parse, ovfs, args.rounds)
    converted = timed(conversion, ovfs, args.rounds)
    size = sum(len(d) for d in ovfs)
    print(f"ovf2params: convert() vs lxml.etree.fromstring (hardened parser) on "
          f"{len(ovfs)} OVFs ({size / 2**20:.0f} MiB, the 7 samples with fresh ids), "
          f"median of {args.rounds}")
    print(f"{'':>10} {'total s':>8} {'per OVF us':>10}")
    for label, t in (("parse", parsed), ("convert", converted)):
        print(f"{label:>10} {t:>8.3f} {t / len(ovfs) * 1e6:>10.1f}")
    print(f"ratio convert/parse: {converted / parsed:.2f}")


if __name__ == "__main__":
    main()
