"""python -m composer_prx.bench NAME [args...] -- side-by-side benchmarks printed as ratios.

`python -m composer_prx.bench all [--quick] [--benches NAME ...]` runs them one after another and
prints one markdown table of every ratio beside its goal; `--quick` gives each bench its QUICK_ARGS
(fewer rounds and steps, same geometry).
"""

import argparse
import importlib
import sys

from composer_prx.bench.common import Row, rows_table

BENCHES = ("step", "tread", "muon", "data", "repa", "perceptual")  # `all` runs these
LONG = ("ablate",)  # run by name only: ~60 minutes here


def run_all(argv: list[str]) -> list[Row]:
    """Every bench (or --benches), quick or default settings -> their rows, printed as one table at the end."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench all")
    parser.add_argument("--quick", action="store_true", help="each bench's QUICK_ARGS: fewer rounds and steps")
    parser.add_argument("--benches", nargs="+", choices=BENCHES, default=list(BENCHES))
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for name in args.benches:
        module = importlib.import_module(f"composer_prx.bench.{name}")
        bench_args = list(module.QUICK_ARGS) if args.quick else []
        print(f"\n## bench {name} {' '.join(bench_args)}".rstrip(), flush=True)
        rows += module.main(bench_args)
    print("\n" + rows_table(rows))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*BENCHES, *LONG, "all"):
        raise SystemExit(f"usage: python -m composer_prx.bench {{{','.join(BENCHES + LONG)},all}} [args...]")
    if argv[0] == "all":
        return run_all(argv[1:])
    return importlib.import_module(f"composer_prx.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
