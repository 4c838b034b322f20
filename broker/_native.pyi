# Type stub for the cffi extension built from native/ (see native/kb.h for the C API).
from typing import Any

ffi: Any
lib: Any
