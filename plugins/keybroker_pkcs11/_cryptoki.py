"""The few PKCS#11 calls python-pkcs11 0.10 does not expose, made with ctypes on the same module.

python-pkcs11 stays the binding for everything else. This module reaches
under it on purpose, in three places, each for a measured reason:

1. **C_Initialize with CKF_OS_LOCKING_OK.** python-pkcs11 0.10.1 calls
   ``C_Initialize(NULL)``. PKCS#11 reads a NULL argument as "the application
   will not call the library from several threads", and SoftHSM2 then turns
   its internal mutexes off: concurrent calls on *different* sessions from
   worker threads crash the process (measured: SIGSEGV within a few thousand
   AES-GCM calls from four threads, or CKR_GENERAL_ERROR). We therefore load
   the module ourselves first, call ``C_Initialize`` with
   ``CK_C_INITIALIZE_ARGS{flags = CKF_OS_LOCKING_OK}`` through its function
   list, and hand python-pkcs11 a :class:`_Library` whose ``initialize`` does
   the same idempotently. python-pkcs11 0.10.1 raises a bare ``PKCS11Error``
   when its own ``C_Initialize(NULL)`` returns
   CKR_CRYPTOKI_ALREADY_INITIALIZED (``assertRV`` accepts only CKR_OK), so
   letting it run after ours is *not* harmless; overriding the ``cpdef
   initialize`` in a Python subclass is what keeps its call from happening.
   ``dlopen`` of one path returns one handle, so both bindings drive the same
   module instance.
2. **C_Login on a session python-pkcs11 opened without a PIN.** Login state
   is per application, not per session: ``Token.open(user_pin=...)`` logs in
   every time (the second raises UserAlreadyLoggedIn, leaking the session it
   had just opened), and ``Session.close()`` of a session opened that way
   calls ``C_Logout``, which logs out *every* session of the process. The
   pool's sessions are all opened without a PIN (so their ``close`` never
   logs out) and the first one that finds the application logged out calls
   ``C_Login`` here; CKR_USER_ALREADY_LOGGED_IN from a concurrent opener is
   success.
3. **C_GetSessionInfo, C_CloseSession, C_CloseAllSessions**: to tell a dead
   session from a bad ciphertext (SoftHSM2 reports a GCM tag mismatch as
   CKR_GENERAL_ERROR), and for fault tests and independent session counts.

Nothing here logs or keeps a PIN; :func:`login` takes it for one call.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Final

import pkcs11
from pkcs11 import _pkcs11

__all__ = ["Cryptoki", "load_library"]

CK_RV = ctypes.c_ulong
CK_ULONG = ctypes.c_ulong

CKR_OK: Final = 0x000
CKR_SESSION_HANDLE_INVALID: Final = 0x0B3
CKR_USER_ALREADY_LOGGED_IN: Final = 0x100
CKR_CRYPTOKI_ALREADY_INITIALIZED: Final = 0x191
CKF_OS_LOCKING_OK: Final = 0x2
CKU_USER: Final = 1
# CKS_RO_USER_FUNCTIONS and CKS_RW_USER_FUNCTIONS: the application is logged in as the user.
USER_STATES: Final = frozenset({1, 3})


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


class _SessionInfo(ctypes.Structure):
    _fields_ = [("slotID", CK_ULONG), ("state", CK_ULONG), ("flags", CK_ULONG), ("ulDeviceError", CK_ULONG)]


# CK_FUNCTION_LIST up to C_Login, in the order of the PKCS#11 header (pkcs11f.h);
# only the leading entries are read, so the rest need not be declared.
_FUNCTIONS = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState",
    "C_Login",
)  # fmt: skip


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", _Version)] + [(name, ctypes.c_void_p) for name in _FUNCTIONS]


_Initialize = ctypes.CFUNCTYPE(CK_RV, ctypes.POINTER(_InitArgs))
_CloseAll = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_CloseSession = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_GetSessionInfo = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(_SessionInfo))
_Login = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)


class Cryptoki:
    """ctypes access to one PKCS#11 module's function list (the calls listed above).

    Args:
        path: the module (``.so``) path, exactly as python-pkcs11 will be given it.

    Raises:
        OSError: the module cannot be loaded or has no ``C_GetFunctionList``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # Kept for the process's life: it pins the module in memory.
        self._dll = ctypes.CDLL(path)
        functions = ctypes.POINTER(_FunctionList)()
        rv = self._dll.C_GetFunctionList(ctypes.byref(functions))
        if rv != CKR_OK:
            raise OSError(f"C_GetFunctionList of {path} failed (CKR {rv:#x})")
        table = functions.contents
        self._initialize = _Initialize(table.C_Initialize)
        self._close_all = _CloseAll(table.C_CloseAllSessions)
        self._close_session = _CloseSession(table.C_CloseSession)
        self._session_info = _GetSessionInfo(table.C_GetSessionInfo)
        self._login = _Login(table.C_Login)

    def __repr__(self) -> str:
        return f"<Cryptoki {self.path!r}>"

    def initialize(self) -> bool:
        """C_Initialize with OS locking. True if this call initialized the module.

        Raises:
            pkcs11.PKCS11Error: any return other than CKR_OK or
                CKR_CRYPTOKI_ALREADY_INITIALIZED.
        """
        args = _InitArgs(flags=CKF_OS_LOCKING_OK)
        rv = self._initialize(ctypes.byref(args))
        if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED:
            return False
        _check(rv, "C_Initialize")
        return True

    def session_state(self, handle: int) -> int | None:
        """The session's CKS_* state, or None when the handle is no longer a live session."""
        info = _SessionInfo()
        rv = self._session_info(handle, ctypes.byref(info))
        if rv != CKR_OK:
            return None
        return int(info.state)

    def login(self, handle: int, pin: bytes) -> None:
        """Log the application in as the user through ``handle`` unless it already is.

        Raises:
            pkcs11.PKCS11Error: the token refused (PinIncorrect, PinLocked, ...).
        """
        rv = self._login(handle, CKU_USER, pin, len(pin))
        if rv != CKR_USER_ALREADY_LOGGED_IN:
            _check(rv, "C_Login")

    def close_all_sessions(self, slot_id: int) -> None:
        """C_CloseAllSessions: every session of this process on the slot (fault tests).

        Only while no thread is inside a call on one of them: SoftHSM2 2.6
        frees a session under a concurrent call (measured: SIGSEGV).
        """
        _check(self._close_all(slot_id), "C_CloseAllSessions")

    def close_session(self, handle: int) -> None:
        """C_CloseSession behind python-pkcs11's back (fault tests); same caveat."""
        _check(self._close_session(handle), "C_CloseSession")

    def live_sessions(self, handles: range) -> int:
        """How many of ``handles`` are open sessions, asking the module itself.

        SoftHSM2 reports ulSessionCount as CK_UNAVAILABLE_INFORMATION, so an
        independent count probes handles with C_GetSessionInfo instead.
        """
        return sum(1 for handle in handles if self.session_state(handle) is not None)


def _check(rv: int, call: str) -> None:
    if rv == CKR_OK:
        return
    # python-pkcs11's own table maps return values onto its exception classes.
    error = _ERRORS.get(rv)
    if error is not None:
        raise error()
    raise pkcs11.PKCS11Error(f"{call} failed (CKR {rv:#x})")


_ERRORS: dict[int, type[pkcs11.PKCS11Error]] = {
    0x005: pkcs11.exceptions.GeneralError,
    0x006: pkcs11.exceptions.FunctionFailed,
    0x030: pkcs11.exceptions.DeviceError,
    0x031: pkcs11.exceptions.DeviceMemory,
    0x032: pkcs11.exceptions.DeviceRemoved,
    0x0A0: pkcs11.exceptions.PinIncorrect,
    0x0A2: pkcs11.exceptions.PinLenRange,
    0x0A3: pkcs11.exceptions.PinExpired,
    0x0A4: pkcs11.exceptions.PinLocked,
    0x0B0: pkcs11.exceptions.SessionClosed,
    CKR_SESSION_HANDLE_INVALID: pkcs11.exceptions.SessionHandleInvalid,
    0x0E0: pkcs11.exceptions.TokenNotPresent,
    0x101: pkcs11.exceptions.UserNotLoggedIn,
    0x102: pkcs11.exceptions.UserPinNotInitialized,
}


class _Library(_pkcs11.lib):
    """python-pkcs11's ``lib`` whose ``initialize`` passes CKF_OS_LOCKING_OK (see module docstring)."""

    def initialize(self) -> None:
        # Called by the base __init__ (after it has set ``so``) and by
        # pkcs11.lib() whenever ``initialized`` reads False, which it always
        # does here: that flag is a read-only C field only the base sets.
        _cryptoki_for(self.so).initialize()


# One load at a time; the dicts are only written under the lock (reads of a
# dict entry are atomic under the GIL).
_load_lock = threading.Lock()
_cryptokis: dict[str, Cryptoki] = {}
_libraries: dict[str, Any] = {}


def _cryptoki_for(path: str) -> Cryptoki:
    found = _cryptokis.get(path)
    return found if found is not None else Cryptoki(path)


def load_library(path: str) -> tuple[Any, Cryptoki]:
    """The python-pkcs11 library object for ``path``, initialized for threads, and its ctypes twin.

    Loaded once per process and path. The library object is also entered in
    python-pkcs11's own cache, so ``pkcs11.lib(path)`` elsewhere in the
    process returns it instead of initializing the module without locks.

    Raises:
        RuntimeError: python-pkcs11 already initialized this module its own
            way (without OS locking) in this process.
        OSError / pkcs11.PKCS11Error: the module cannot be loaded or initialized.
    """
    with _load_lock:
        library = _libraries.get(path)
        if library is not None:
            return library, _cryptokis[path]
        cache: dict[str, Any] = pkcs11._loaded
        if path in cache:
            raise RuntimeError(
                f"the PKCS#11 module {path} was already initialized in this process without "
                "OS locking; keybroker must load it first"
            )
        cryptoki = _cryptokis.get(path) or Cryptoki(path)
        cryptoki.initialize()
        _cryptokis[path] = cryptoki
        library = _Library(path)
        # Never deallocated: python-pkcs11's lib.__dealloc__ looks up
        # ``self.unload`` and, on this Python subclass, fails with
        # AttributeError (printed at interpreter exit as "Error in
        # sys.excepthook"). The module stays loaded for the process's life
        # anyway (the ctypes handle), and C_Finalize is deliberately not
        # called: a worker thread may still be inside a call at exit.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(library))
        _libraries[path] = library
        cache[path] = library
        return library, cryptoki
