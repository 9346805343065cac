"""The benchmark scripts (run as `python benchmarks/bench_x.py`) and what they share
(_common.py); a package so that the tests can import `benchmarks._common`."""
