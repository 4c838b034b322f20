"""Conformance suites and helpers for testing keybroker plugins.

A backend plugin's tests subclass :class:`BackendConformance` and provide a
``backend`` fixture (see :mod:`broker.testing.backend_suite`); a store
plugin's tests subclass :class:`StoreConformance` and provide a ``store``
fixture, and optionally ``reopen`` (see :mod:`broker.testing.store_suite`).
"""

from .backend_suite import BackendConformance as BackendConformance
from .store_suite import StoreConformance as StoreConformance
