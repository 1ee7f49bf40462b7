"""Benchmarks behind `longtrain bench NAME`: each module has `main(argv) -> int`,
prints a table and writes JSON (default bench-results/NAME.json)."""
