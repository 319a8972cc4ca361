"""python -m composer_prx.bench NAME [args...] -- side-by-side benchmarks printed as ratios."""

import importlib
import sys

BENCHES = ("step", "tread", "muon", "data", "repa", "perceptual", "ablate")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(f"usage: python -m composer_prx.bench {{{','.join(BENCHES)}}} [args...]")
    module = importlib.import_module(f"composer_prx.bench.{argv[0]}")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
