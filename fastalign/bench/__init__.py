"""Benchmark suites: ``fastalign bench <suite>`` runs ``fastalign.bench.<suite>.main(argv)``.

Each suite prints a table and writes JSON (and a PNG chart where it has one) under
``bench/results``; :mod:`fastalign.bench.common` holds the timing and peak-memory helpers.
"""
