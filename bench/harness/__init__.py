"""What the benchmarks share; not benchmarks themselves (each ``bench/*.py`` is one, and
ends with a JSON line of its figures)."""
