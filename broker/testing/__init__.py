"""Conformance suites and helpers for testing keybroker plugins.

A backend plugin's tests subclass :class:`BackendConformance` and provide a
``backend`` fixture; see :mod:`broker.testing.backend_suite`.
"""

from .backend_suite import BackendConformance as BackendConformance
