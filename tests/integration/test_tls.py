"""The TLS listener: client certificates required, principals from SAN or CN."""

from __future__ import annotations

import contextlib
import datetime
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.auth import principal_for_cert, principal_for_unix, unix_peer
from broker.client import AsyncClient, Client, ConnectionLost, client_ssl_context
from broker.config import Config, Limits, TLSConfig
from broker.server import ServerInfo
from tests._transport_helpers import EchoHandler, RawConn, make_config, running_server, short_tmpdir

SPIFFE_ID = "spiffe://example.org/ns/prod/sa/billing"


def issue_uri_cert(ca: trustme.CA, uri: str, common_name: str | None = None) -> tuple[bytes, bytes]:
    """A client certificate with a URI SAN (trustme issues DNS/IP/email only)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _der_tlv(tag: int, body: bytes) -> bytes:
    """A DER tag-length-value."""
    size = len(body)
    if size < 128:
        return bytes([tag, size]) + body
    width = (size.bit_length() + 7) // 8
    return bytes([tag, 0x80 | width]) + size.to_bytes(width, "big") + body


def issue_edi_party_cert(ca: trustme.CA) -> tuple[bytes, bytes]:
    """A validly signed client certificate whose SAN holds an EDIPartyName.

    OpenSSL accepts it; cryptography cannot read its extensions (it raises
    UnsupportedGeneralNameType, a plain Exception). No builder writes such a
    SAN, so a DNS name of the same length is swapped for one in the
    to-be-signed bytes, which are then signed again.
    """
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    leaf = ca.issue_cert("aaaaaaaaaa", common_name="mallory")
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes
    dns_name, edi_party = b"\x82\x0aaaaaaaaaaa", b"\xa5\x0a\xa1\x08\x0c\x06BBBBBB"
    assert tbs.count(dns_name) == 1
    evil_tbs = tbs.replace(dns_name, edi_party)
    at = der.index(tbs) + len(tbs)
    signature_algorithm = der[at : at + 2 + der[at + 1]]
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    signature = ca_key.sign(evil_tbs, ec.ECDSA(hashes.SHA256()))
    evil = _der_tlv(0x30, evil_tbs + signature_algorithm + _der_tlv(0x03, b"\x00" + signature))
    return ssl.DER_cert_to_PEM_cert(evil).encode(), leaf.private_key_pem.bytes()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def tls_config(tmpdir_short: Path, ca: trustme.CA) -> Config:
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmpdir_short / "server.pem"))
    ca.cert_pem.write_to_path(str(tmpdir_short / "ca.pem"))
    tls = TLSConfig(
        cert_file=tmpdir_short / "server.pem",
        key_file=tmpdir_short / "server.pem",
        client_ca_file=tmpdir_short / "ca.pem",
        host="127.0.0.1",
        port=0,
    )
    return make_config(tmpdir_short, tls=tls)


@pytest.fixture
def handler() -> EchoHandler:
    return EchoHandler()


@pytest.fixture
async def server(tls_config: Config, handler: EchoHandler) -> AsyncIterator[ServerInfo]:
    async with running_server(tls_config, handler) as info:
        yield info


def client_context(directory: Path, cert_pem: bytes | None, key_pem: bytes | None) -> ssl.SSLContext:
    if cert_pem is None or key_pem is None:
        return client_ssl_context(directory / "ca.pem")
    (directory / "client.pem").write_bytes(cert_pem + key_pem)
    return client_ssl_context(directory / "ca.pem", directory / "client.pem")


async def test_principal_from_uri_san(server: ServerInfo, ca: trustme.CA, tmpdir_short: Path) -> None:
    assert server.tls_port
    cert, key = issue_uri_cert(ca, SPIFFE_ID, common_name="ignored-cn")
    ctx = client_context(tmpdir_short, cert, key)
    async with AsyncClient(host="127.0.0.1", port=server.tls_port, ssl_context=ctx) as client:
        who = await client.call("whoami", {})
    assert who == {"name": SPIFFE_ID, "transport": "tls", "uid": None, "gid": None, "pid": None}


async def test_principal_from_cn_with_sync_client(
    server: ServerInfo, ca: trustme.CA, tmpdir_short: Path
) -> None:
    assert server.tls_port
    leaf = ca.issue_cert("app@example.org", common_name="billing-service")
    ctx = client_context(tmpdir_short, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    port = server.tls_port

    def work() -> dict[str, object]:
        with Client(host="127.0.0.1", port=port, ssl_context=ctx, timeout=5) as client:
            result: dict[str, object] = client.call("whoami", {})
            return result

    who = await trio.to_thread.run_sync(work)
    assert who["name"] == "billing-service"
    assert who["transport"] == "tls"


async def test_mapped_principal(tls_config: Config, ca: trustme.CA, tmpdir_short: Path) -> None:
    config = replace(tls_config, principals={SPIFFE_ID: "billing"})
    async with running_server(config, EchoHandler()) as info:
        assert info.tls_port
        cert, key = issue_uri_cert(ca, SPIFFE_ID)
        ctx = client_context(tmpdir_short, cert, key)
        async with AsyncClient(host="127.0.0.1", port=info.tls_port, ssl_context=ctx) as client:
            assert (await client.call("whoami", {}))["name"] == "billing"


async def _raw_tls_attempt(port: int, ctx: ssl.SSLContext) -> bytes:
    """Handshake and send a ping; returns what the server answers (b"" or raises if refused)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    try:
        await stream.do_handshake()
        await stream.send_all(msgpack.packb([0, 1, "echo", [{}]]))
        return await stream.receive_some(4096)
    finally:
        await trio.aclose_forcefully(stream)


async def _answered_nothing(port: int, ctx: ssl.SSLContext) -> None:
    """The server refuses the connection: the handshake fails, or the request gets no answer."""
    with trio.fail_after(5):
        try:
            reply = await _raw_tls_attempt(port, ctx)
        except trio.BrokenResourceError:
            reply = b""
    assert reply == b""


async def test_no_client_cert_refused(server: ServerInfo, ca: trustme.CA, tmpdir_short: Path) -> None:
    assert server.tls_port
    ctx = client_context(tmpdir_short, None, None)
    await _answered_nothing(server.tls_port, ctx)
    with trio.fail_after(5), pytest.raises((ConnectionLost, trio.BrokenResourceError)):
        async with AsyncClient(host="127.0.0.1", port=server.tls_port, ssl_context=ctx) as client:
            await client.call("echo", {})


async def test_cert_from_another_ca_refused(server: ServerInfo, tmpdir_short: Path, ca: trustme.CA) -> None:
    assert server.tls_port
    other = trustme.CA()
    leaf = other.issue_cert("x@example.org", common_name="intruder")
    ctx = client_context(tmpdir_short, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    await _answered_nothing(server.tls_port, ctx)


@pytest.mark.parametrize("where", ["cn", "uri"])
async def test_a_certificate_naming_a_unix_peer_is_refused(
    server: ServerInfo, ca: trustme.CA, tmpdir_short: Path, where: str
) -> None:
    """uid:0 is the broker's owner (an admin by default): only the kernel names a peer so."""
    assert server.tls_port
    if where == "cn":
        leaf = ca.issue_cert("x@example.org", common_name="UID:0")
        cert, key = leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()
    else:
        cert, key = issue_uri_cert(ca, "uid:0", common_name="harmless")
    ctx = client_context(tmpdir_short, cert, key)
    await _answered_nothing(server.tls_port, ctx)


async def test_a_certificate_cryptography_cannot_read_is_refused_and_the_broker_serves_on(
    server: ServerInfo, ca: trustme.CA, tmpdir_short: Path
) -> None:
    assert server.tls_port
    cert, key = issue_edi_party_cert(ca)
    with pytest.raises(x509.UnsupportedGeneralNameType):
        principal_for_cert(x509.load_pem_x509_certificate(cert), {})
    await _answered_nothing(server.tls_port, client_context(tmpdir_short, cert, key))
    good, good_key = issue_uri_cert(ca, SPIFFE_ID)
    ctx = client_context(tmpdir_short, good, good_key)
    with trio.fail_after(5):
        async with AsyncClient(host="127.0.0.1", port=server.tls_port, ssl_context=ctx) as client:
            assert (await client.call("whoami", {}))["name"] == SPIFFE_ID


async def test_tls12_refused(server: ServerInfo, ca: trustme.CA, tmpdir_short: Path) -> None:
    assert server.tls_port
    leaf = ca.issue_cert("x@example.org", common_name="old-client")
    ctx = client_context(tmpdir_short, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await _raw_tls_attempt(server.tls_port, ctx)


async def _closed_by_server(stream: trio.SocketStream) -> None:
    """The server closes ``stream`` (a close or a reset) within a few seconds."""
    with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
        assert await stream.receive_some(4096) == b""


async def test_tcp_peers_cannot_use_up_the_unix_sockets_connections(tls_config: Config) -> None:
    config = replace(tls_config, limits=Limits(max_connections=2))
    async with running_server(config, EchoHandler()) as info:
        assert info.tls_port
        # Never a byte: not even authenticated.
        squatters = [await trio.open_tcp_stream("127.0.0.1", info.tls_port) for _ in range(2)]
        await _closed_by_server(await trio.open_tcp_stream("127.0.0.1", info.tls_port))
        local = await RawConn.open(info.socket_path)
        with trio.fail_after(5):
            assert (await local.call(1, "echo", {})).error is None
        for stream in squatters:
            await stream.aclose()


async def test_a_tls_handshake_has_its_own_short_timeout(tls_config: Config) -> None:
    config = replace(tls_config, limits=Limits(handshake_timeout_s=0.2))
    async with running_server(config, EchoHandler()) as info:
        assert info.tls_port
        silent = await trio.open_tcp_stream("127.0.0.1", info.tls_port)
        start = trio.current_time()
        await _closed_by_server(silent)
        assert trio.current_time() - start < 2


async def test_tls_handshakes_under_way_are_capped(
    tls_config: Config, ca: trustme.CA, tmpdir_short: Path
) -> None:
    config = replace(tls_config, limits=Limits(max_tls_handshakes=1))
    async with running_server(config, EchoHandler()) as info:
        assert info.tls_port
        silent = await trio.open_tcp_stream("127.0.0.1", info.tls_port)
        await trio.sleep(0.1)
        await _closed_by_server(await trio.open_tcp_stream("127.0.0.1", info.tls_port))
        await silent.aclose()
        await trio.sleep(0.1)
        cert, key = issue_uri_cert(ca, SPIFFE_ID)
        ctx = client_context(tmpdir_short, cert, key)
        with trio.fail_after(5):
            async with AsyncClient(host="127.0.0.1", port=info.tls_port, ssl_context=ctx) as client:
                assert (await client.call("whoami", {}))["name"] == SPIFFE_ID


# -- auth unit checks (pure) -----------------------------------------------------


def test_principal_for_cert_prefers_spiffe_uri(ca: trustme.CA) -> None:
    cert_pem, _ = issue_uri_cert(ca, SPIFFE_ID, common_name="cn")
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert principal_for_cert(der, {}).name == SPIFFE_ID
    assert principal_for_cert(cert, {SPIFFE_ID: "svc"}).name == "svc"


def test_principal_for_cert_without_identity(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("x@example.org")  # email SAN only, no CN
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    with pytest.raises(ValueError, match="neither"):
        principal_for_cert(cert, {})
    with pytest.raises(ValueError):
        principal_for_cert(b"not a certificate", {})


def test_an_overlong_certificate_identity_is_refused(ca: trustme.CA) -> None:
    cert_pem, _ = issue_uri_cert(ca, "spiffe://example.org/" + "x" * 1100)
    with pytest.raises(ValueError, match="over 1024"):
        principal_for_cert(x509.load_pem_x509_certificate(cert_pem), {})


def test_principal_for_unix_mapping() -> None:
    p = principal_for_unix(1000, 100, 42, {"uid:1000": "alice"})
    assert (p.name, p.transport, p.uid, p.gid, p.pid) == ("alice", "unix", 1000, 100, 42)
    assert principal_for_unix(7, 7, 7, {}).name == "uid:7"


class _PeerCred:
    """A socket whose kernel reports a peer with a uid and gid of 2**31 and up."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes:
        return struct.pack("=iii", 42, -2, -3)  # the bytes of uid 4294967294, gid 4294967293


def test_large_uids_are_read_unsigned() -> None:
    uid, gid, pid = unix_peer(_PeerCred())
    assert (uid, gid, pid) == (2**32 - 2, 2**32 - 3, 42)
    assert principal_for_unix(uid, gid, pid, {}).name == "uid:4294967294"
