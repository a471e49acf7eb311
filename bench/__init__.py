"""Benchmarks, kept out of the library packages: `python -m bench.model` and `python -m bench.server`
(`make bench`), with the BENCHMARKS.md writer in `bench.report`."""
