"""Whole local stacks that benchmarks (``bench/scale.py``, ``bench/isolation.py``) and
tests (``tests/sla``) both drive: helpers, kept beside the tests; every ``bench/*.py`` is a
benchmark ending with a JSON line of its figures."""
