"""``python -m bench NAME [--quick]``: run one benchmark, print its table,
write bench/results/NAME.json."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys

from bench import RESULTS_DIR, format_table
from broker.allocator import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", help="benchmark module under bench/, e.g. envelope")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    args, extra = parser.parse_known_args(argv)  # extra options go to benchmarks that take argv
    if not re.fullmatch(r"[a-z][a-z0-9_]*", args.name):
        parser.error("benchmark names are lowercase identifiers")
    try:
        module = importlib.import_module(f"bench.{args.name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{args.name}":
            parser.error(f"no benchmark named {args.name!r}")
        raise
    # Measured as `keybroker serve` runs: with its heap thresholds (both sides of every comparison).
    heap_tuned = keep_freed_memory()
    result = module.run(quick=args.quick, **({"argv": extra} if extra else {}))
    result.setdefault("heap_thresholds_raised", heap_tuned)
    result.setdefault("name", args.name)
    result.setdefault("command", "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(format_table(result["columns"], result["rows"]))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
