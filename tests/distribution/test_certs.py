"""cert.ca, cert.issue, cert.list and the scheduler's certificate_expiring event."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.app import Broker, open_broker
from broker.certs import splice_signature
from broker.errors import BrokerError
from broker.events import EventKind, KeyEvent
from tests.conftest import Caller, ConfigFactory
from tests.distribution._fakes import FakeClock

DAY = 86_400
SUBJECT_KEY = ec.generate_private_key(ec.SECP256R1())


def csr(
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool | None = None,
    path_length: int | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
    cn: str = "svc.example.org",
) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(SUBJECT_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def fails(call: Any, code: str) -> BrokerError:
    with pytest.raises(BrokerError) as info:
        await call
    assert info.value.code == code, info.value.message
    return info.value


POLICY = {"plugins": {"certificates": {"max_validity_days": 60, "default_validity_days": 40}}}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ca_broker(make_config: ConfigFactory, clock: FakeClock) -> AsyncIterator[Broker]:
    async with open_broker(make_config(POLICY), clock=clock, run_scheduler=False) as broker:
        yield broker


@pytest.mark.parametrize("ca_type", ["ecdsa-p256", "rsa-3072"])
async def test_issue_verifies_with_cryptography(ca_broker: Broker, owner: str, ca_type: str) -> None:
    admin = Caller(ca_broker, owner)
    await admin("key.create", name="pki/ca", type=ca_type)
    ca_out = await admin("cert.ca", ca_key="pki/ca")
    ca_cert = x509.load_pem_x509_certificate(ca_out["pem"].encode())
    ca_cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = (await admin("key.public", name="pki/ca"))["pem"]
    assert (
        ca_cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public.encode()
    )
    # The CA certificate is made once and kept.
    assert (await admin("cert.ca", ca_key="pki/ca"))["pem"] == ca_out["pem"]
    sans = [x509.DNSName("svc.example.org"), x509.UniformResourceIdentifier("spiffe://example.org/svc")]
    out = await admin(
        "cert.issue", ca_key="pki/ca", csr=csr(sans=sans, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    )
    cert = x509.load_pem_x509_certificate(out["pem"].encode())
    cert.verify_directly_issued_by(ca_cert)
    assert out["ca_pem"] == ca_out["pem"] and out["serial"] == f"{cert.serial_number:040x}"
    assert cert.subject.rfc4514_string() == "CN=svc.example.org" and cert.issuer == ca_cert.subject
    assert out["not_after"] - out["not_before"] == 40 * DAY
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == sans
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    if ca_type == "rsa-3072":
        assert cert.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSASSA_PSS
    short = await admin("cert.issue", ca_key="pki/ca", csr=csr(), validity_days=7)
    assert short["not_after"] - short["not_before"] == 7 * DAY


async def test_policy_limits_are_refused(ca_broker: Broker, owner: str) -> None:
    admin = Caller(ca_broker, owner)
    await admin("key.create", name="ca", type="ecdsa-p256")
    cases = [
        ({"validity_days": 61}, "certificates.max_validity_days"),
        ({"csr": csr(ca=True, path_length=0)}, "certificates.allow_ca"),
        ({"csr": csr(sans=[x509.RFC822Name("a@example.org")])}, "certificates.san_types"),
        ({"csr": csr(eku=[ExtendedKeyUsageOID.CODE_SIGNING])}, "certificates.extended_key_usages"),
    ]
    for extra, rule in cases:
        params = {"ca_key": "ca", "csr": csr(), **extra}
        err = await fails(admin("cert.issue", **params), "invalid_argument")
        assert err.details == {"rule": rule}, err.message
    await fails(admin("cert.issue", ca_key="ca", csr="garbage"), "invalid_argument")
    # A CSR whose self-signature does not verify.
    good = x509.load_pem_x509_csr(csr().encode()).public_bytes(serialization.Encoding.DER)
    broken = good[:-3] + bytes([good[-3] ^ 1]) + good[-2:]
    pem = x509.load_der_x509_csr(broken).public_bytes(serialization.Encoding.PEM).decode()
    await fails(admin("cert.issue", ca_key="ca", csr=pem), "invalid_argument")
    await admin("key.create", name="ed", type="ed25519")
    await fails(admin("cert.issue", ca_key="ed", csr=csr()), "invalid_argument")
    await admin("key.create", name="sym", type="aes256-gcm")
    await fails(admin("cert.ca", ca_key="sym"), "invalid_argument")
    await fails(Caller(ca_broker, "uid:4242")("cert.issue", ca_key="ca", csr=csr()), "permission_denied")
    await admin("key.disable", name="ca")
    await fails(admin("cert.issue", ca_key="ca", csr=csr()), "invalid_state")


def _csr_with(
    key: Any, *, name: x509.Name | None = None, extensions: Sequence[x509.ExtensionType] = ()
) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        name if name is not None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc")])
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")  # DER: the fewest octets
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _csr_with_san_twice() -> str:
    """A correctly signed CSR asking for two subjectAltName extensions (builders refuse to make one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    placeholder = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x30\x03\x82\x01a")
    built = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")]))
        .add_extension(placeholder, critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("b")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    # 1.2.3.4 and subjectAltName (2.5.29.17) encode to three bytes each.
    info = built.tbs_certrequest_bytes.replace(b"\x06\x03\x2a\x03\x04", b"\x06\x03\x55\x1d\x11")
    ecdsa_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    der = _der(0x30, info + ecdsa_sha256 + _der(0x03, b"\x00" + signature))
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


async def test_csrs_a_certificate_must_not_vouch_for(ca_broker: Broker, owner: str) -> None:
    admin = Caller(ca_broker, owner)
    await admin("key.create", name="ca", type="ecdsa-p256")
    weak = {
        "rsa-1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "rsa-2048, e=3": rsa.generate_private_key(public_exponent=3, key_size=2048),
        "dsa-2048": dsa.generate_private_key(key_size=2048),
        "secp192r1": ec.generate_private_key(ec.SECP192R1()),
    }
    for what, key in weak.items():
        err = await fails(admin("cert.issue", ca_key="ca", csr=_csr_with(key)), "invalid_argument")
        assert "subject key" in err.message, what
    nameless = _csr_with(SUBJECT_KEY, name=x509.Name([]))
    err = await fails(admin("cert.issue", ca_key="ca", csr=nameless), "invalid_argument")
    assert "no subject" in err.message
    san = x509.SubjectAlternativeName([x509.DNSName("a.example.org")])
    err = await fails(admin("cert.issue", ca_key="ca", csr=_csr_with_san_twice()), "invalid_argument")
    assert "repeated" in err.message
    # What a certificate may vouch for is still issued, starting a little before now.
    fine = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate(),
    )
    for key in fine:
        request = _csr_with(key, name=x509.Name([]), extensions=[san])
        issued = await admin("cert.issue", ca_key="ca", csr=request)
        cert = x509.load_pem_x509_certificate(issued["pem"].encode())
        assert int(cert.not_valid_before_utc.timestamp()) == ca_broker.service.now() - 300


async def test_policy_can_allow_intermediate_cas(make_config: ConfigFactory, owner: str) -> None:
    policy = {"plugins": {"certificates": {"allow_ca": True, "max_path_length": 0}}}
    async with open_broker(make_config(policy), run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="root", type="ecdsa-p256")
        out = await admin("cert.issue", ca_key="root", csr=csr(ca=True, path_length=0))
        constraints = x509.load_pem_x509_certificate(out["pem"].encode()).extensions
        value = constraints.get_extension_for_class(x509.BasicConstraints).value
        assert value.ca and value.path_length == 0
        err = await fails(
            admin("cert.issue", ca_key="root", csr=csr(ca=True, path_length=3)), "invalid_argument"
        )
        assert err.details == {"rule": "certificates.max_path_length"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"bogus": 1}, "unknown option(s) in [plugins.certificates]: bogus"),
        ({"allow_ca": "yes"}, "plugins.certificates.allow_ca has the wrong type"),
        ({"san_types": ["dns", "x400"]}, "plugins.certificates.san_types: unknown x400"),
        (
            {"default_validity_days": 400},
            "plugins.certificates.default_validity_days must be 1..max_validity_days",
        ),
    ],
)
async def test_bad_policy_stops_the_broker_opening(
    make_config: ConfigFactory, section: dict[str, Any], message: str
) -> None:
    # Checked when the broker opens, not at the first cert.* call.
    with pytest.raises(BrokerError) as info:
        async with open_broker(make_config({"plugins": {"certificates": section}}), run_scheduler=False):
            pass
    assert info.value.code == "invalid_argument"
    assert info.value.message == f"config: {message}"


async def test_list_and_expiry_event(ca_broker: Broker, owner: str, clock: FakeClock) -> None:
    admin = Caller(ca_broker, owner)
    await admin("key.create", name="ca/a", type="ecdsa-p256")
    await admin("key.create", name="ca/b", type="ecdsa-p256")
    soon = await admin("cert.issue", ca_key="ca/a", csr=csr(cn="soon"), validity_days=31)
    await admin("cert.issue", ca_key="ca/a", csr=csr(cn="late"), validity_days=60)
    other = await admin("cert.issue", ca_key="ca/b", csr=csr(cn="other"), validity_days=10)
    listed = await admin("cert.list")
    assert len(listed["certificates"]) == 3 and listed["cursor"] is None
    assert {c["serial"] for c in (await admin("cert.list", ca_key="ca/b"))["certificates"]} == {
        other["serial"]
    }
    expiring = await admin("cert.list", expiring_within_days=31)
    assert {c["serial"] for c in expiring["certificates"]} == {soon["serial"], other["serial"]}
    page = await admin("cert.list", limit=2)
    assert len(page["certificates"]) == 2 and page["cursor"] is not None
    rest = await admin("cert.list", limit=2, cursor=page["cursor"])
    assert len(rest["certificates"]) == 1 and rest["cursor"] is None
    for bad in ("", "a\x00b", "x" * 300):
        with pytest.raises(BrokerError) as info:
            await admin("cert.list", cursor=bad)
        assert info.value.code == "invalid_argument" and info.value.details == {"field": "cursor"}

    events: list[KeyEvent] = []
    ca_broker.service.add_listener(events.append)
    await ca_broker.scheduler.run_once()
    # Default window: 30 days. "other" (10 days) is inside it already.
    assert [(e.name, e.event, e.serial) for e in events] == [
        ("ca/b", EventKind.CERTIFICATE_EXPIRING, other["serial"])
    ]
    assert events[0].to_wire()["serial"] == other["serial"]
    clock.now += 2 * DAY  # "soon" now expires in 29 days
    await ca_broker.scheduler.run_once()
    assert [e.serial for e in events] == [other["serial"], soon["serial"]]
    clock.now += 2 * DAY
    await ca_broker.scheduler.run_once()
    assert len(events) == 2  # each certificate is announced once
    audit = (ca_broker.config.audit_dir / "audit.jsonl").read_text().splitlines()
    announced = [json.loads(line) for line in audit if '"cert.expiring"' in line]
    assert [r["details"]["serial"] for r in announced] == [other["serial"], soon["serial"]]


def test_splice_signature_keeps_tbs_and_algorithm() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    other = key.sign(cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    spliced = x509.load_der_x509_certificate(
        splice_signature(cert.public_bytes(serialization.Encoding.DER), other)
    )
    assert spliced.signature == other and spliced.tbs_certificate_bytes == cert.tbs_certificate_bytes
    spliced.verify_directly_issued_by(spliced)
