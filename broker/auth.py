"""Peer identity: who is on the other end of a connection.

Unix socket peers are named by the kernel (SO_PEERCRED); TLS peers by their
verified client certificate. Either identity may be mapped to a configured
name through ``config.principals``. Nothing here decides what a principal may
do -- that is policy's job.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["UNIX_NAMESPACE", "Principal", "principal_for_cert", "principal_for_unix", "unix_peer"]

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}: 32 bits each on Linux; uid_t
# and gid_t are unsigned (a uid of 2**31 or more must not read as negative).
_UCRED: Final = struct.Struct("=iII")
# Names of this form are the kernel's word about a Unix peer (SO_PEERCRED).
UNIX_NAMESPACE: Final = "uid:"
# The longest certificate identity taken: every audit record carries it.
MAX_IDENTITY_CHARS: Final = 1024


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated peer.

    Attributes:
        name: ``"uid:N"`` for a Unix peer, the SPIFFE ID (URI SAN) or subject
            CN for a TLS peer -- or the name ``config.principals`` maps that
            identity to.
        transport: ``"unix"``, ``"tls"`` or ``"local"`` (in-process callers).
        uid, gid, pid: the Unix peer's credentials; None over TLS.
    """

    name: str
    transport: str
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None


def unix_peer(sock: _HasSockopt) -> tuple[int, int, int]:
    """The kernel-reported credentials of a connected Unix socket's peer.

    Args:
        sock: a connected AF_UNIX stream socket (stdlib or trio).

    Returns:
        ``(uid, gid, pid)`` -- in the argument order of
        :func:`principal_for_unix`, not struct ucred's (pid, uid, gid).

    Raises:
        OSError: the socket is not a connected Unix socket, or the platform
            has no SO_PEERCRED.
    """
    optname = getattr(socket, "SO_PEERCRED", None)
    if optname is None:
        raise OSError("SO_PEERCRED is not available on this platform")
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, optname, _UCRED.size))
    return uid, gid, pid


def principal_for_unix(uid: int, gid: int, pid: int, mapping: Mapping[str, str]) -> Principal:
    """The principal of a Unix socket peer.

    Args:
        uid, gid, pid: from :func:`unix_peer`.
        mapping: ``config.principals``; ``"uid:N"`` keys rename the peer.

    Returns:
        A principal named ``uid:N`` or its mapped name.
    """
    identity = f"uid:{uid}"
    return Principal(name=mapping.get(identity, identity), transport="unix", uid=uid, gid=gid, pid=pid)


def principal_for_cert(der_or_cert: bytes | x509.Certificate, mapping: Mapping[str, str]) -> Principal:
    """The principal of a TLS peer, from its (already verified) certificate.

    The identity is the certificate's URI SAN -- a ``spiffe://`` one first
    when there are several -- else the subject's common name. An identity
    in the Unix peers' ``uid:N`` namespace is refused: only the kernel names
    a peer ``uid:0`` (the broker's owner, an admin by default), never a
    certificate.

    Args:
        der_or_cert: the DER bytes the TLS layer returns, or a parsed cert.
        mapping: ``config.principals``; the identity may be mapped to a name.

    Returns:
        A principal with transport ``"tls"``.

    Raises:
        ValueError: the certificate does not parse, names no identity, or
            names one in the Unix namespace or longer than MAX_IDENTITY_CHARS.
    """
    if isinstance(der_or_cert, x509.Certificate):
        cert = der_or_cert
    else:
        cert = x509.load_der_x509_certificate(der_or_cert)
    identity = _uri_san(cert) or _common_name(cert)
    if not identity:
        raise ValueError("client certificate has neither a URI SAN nor a subject CN")
    if len(identity) > MAX_IDENTITY_CHARS:
        raise ValueError(f"a client certificate's identity is over {MAX_IDENTITY_CHARS} characters")
    if identity[: len(UNIX_NAMESPACE)].lower() == UNIX_NAMESPACE:
        raise ValueError("a client certificate may not name a Unix peer (uid:N)")
    return Principal(name=mapping.get(identity, identity), transport="tls")


def _uri_san(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    chosen = spiffe or uris
    return chosen[0] if chosen else None


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
