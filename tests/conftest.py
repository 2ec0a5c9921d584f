"""Suite-wide test settings.

Hypothesis's default 200 ms deadline per example is a timed unit test: on the
shared 2-core machine an example can wait that long for a core while a
multi-process test's processes wind down, and the failure would say nothing
about correctness. Speed is measured by the benchmarks in ``bench/``.
"""

from hypothesis import settings

settings.register_profile("quiclb", deadline=None)
settings.load_profile("quiclb")
