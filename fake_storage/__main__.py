"""fake_storage command line: ``python -m fake_storage lunfarm create|destroy|list|reap``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from fake_storage.lunfarm import FarmError, LunFarm, parse_size, reap_orphans


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fake_storage")
    sub = p.add_subparsers(dest="tool", required=True)
    farm = sub.add_parser("lunfarm", help="loop-device LUNs with SCSI identities")
    ops = farm.add_subparsers(dest="op", required=True)
    create = ops.add_parser("create", help="create LUNs (adds to an existing farm)")
    create.add_argument("--dir", type=Path, required=True, help="where backing files live")
    create.add_argument("--count", type=int, default=8)
    create.add_argument("--size", default="1G", help="per LUN, e.g. 1G, 512M")
    create.add_argument("--sector-size", type=int, choices=(512, 4096), default=512)
    create.add_argument("--transport", choices=("iscsi", "fc"), default="iscsi")
    destroy = ops.add_parser("destroy", help="remove every LUN the farm in --dir created")
    destroy.add_argument("--dir", type=Path, required=True)
    listing = ops.add_parser("list", help="print the farm's LUNs as JSON")
    listing.add_argument("--dir", type=Path, required=True)
    ops.add_parser("reap", help="remove farms left by test or benchmark runs that died")
    args = p.parse_args(argv)

    if args.op == "reap":
        for line in reap_orphans():
            print(line)
        return
    # Made by hand: stays until `lunfarm destroy`, never reaped as an orphan.
    lf = LunFarm(args.dir, persistent=True)
    try:
        if args.op == "create":
            for lun in lf.create(args.count, parse_size(args.size),
                                 sector_size=args.sector_size, transport=args.transport):
                print(f"{lun.guid} {lun.loop} {lun.size} {lun.sector_size} {lun.transport}")
        elif args.op == "destroy":
            problems = lf.destroy()
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                sys.exit(1)
        else:
            print(json.dumps([asdict(x) for x in lf.luns], indent=2))
    except FarmError as e:
        sys.exit(f"lunfarm: {e}")


if __name__ == "__main__":
    main()
