"""X.509 certificates signed by keys the broker holds: CA certificates, issuance, inventory.

The CA private key never reaches Python outside its backend. A certificate
is built with ``cryptography``'s :class:`~cryptography.x509.CertificateBuilder`
and signed with a *throwaway* key of the CA key's type, only to obtain the
exact TBS (to-be-signed) encoding -- issuer, subject, extensions and the
signature algorithm identifier, which names the algorithm, not the key. The
TBS bytes are then signed through the backend (``sign``, like any client
signature: ECDSA P-256 / SHA-256, or RSASSA-PSS / SHA-256 / MGF1-SHA-256 /
salt 32 for rsa-3072), the throwaway signature is swapped for the real one
in the DER, and the result is verified with ``cryptography`` against the CA
certificate before it is returned.

Policy (``[plugins.certificates]`` in the broker config, all optional)::

    max_validity_days = 397        # cert.issue refuses longer validity
    default_validity_days = 90
    ca_validity_days = 3650        # lifetime of the self-signed CA certificate
    allow_ca = false               # may an issued certificate be a CA (basicConstraints CA:true)?
    max_path_length = 0            # ... and then with at most this path length
    san_types = ["dns", "ip", "uri"]                    # also "email"
    key_usages = ["digital_signature", "key_encipherment", "key_agreement"]
    # also code_signing, email_protection, time_stamping, ocsp_signing:
    extended_key_usages = ["server_auth", "client_auth"]
    expiry_warning_days = 30       # the scheduler's certificate_expiring event

Issued certificates are kept as store documents (kind ``cert``, id = serial
in hex), CA certificates under kind ``ca_cert``; ``cert.list`` reads them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import Internal, InvalidArgument, Unavailable
from .keys import Key, KeyType

if TYPE_CHECKING:
    from .service import KeyService

__all__ = [
    "CA_KIND",
    "CERT_KIND",
    "CertPolicy",
    "IssuedCert",
    "ca_certificate",
    "certificates_to_warn",
    "issue_certificate",
    "list_certificates",
    "mark_warned",
    "policy_of",
    "splice_signature",
]

CERT_KIND: Final = "cert"
CA_KIND: Final = "ca_cert"
DAY: Final = 86_400
# A CSR bigger than this is not a CSR.
MAX_CSR_CHARS: Final = 64 * 1024
CA_TYPES: Final = frozenset({KeyType.ECDSA_P256, KeyType.RSA_3072})
# docs/protocol.md: rsa-3072 signs with RSASSA-PSS, SHA-256, salt length 32.
PSS_SALT_LEN: Final = 32

_SAN_TYPES: Final[Mapping[type[x509.GeneralName], str]] = {
    x509.DNSName: "dns",
    x509.IPAddress: "ip",
    x509.UniformResourceIdentifier: "uri",
    x509.RFC822Name: "email",
}
_KEY_USAGES: Final = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)
_EKUS: Final[Mapping[str, x509.ObjectIdentifier]] = {
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code_signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email_protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "time_stamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp_signing": ExtendedKeyUsageOID.OCSP_SIGNING,
}
# Extensions taken from a CSR (after the policy checks); any other critical
# extension is refused, any other non-critical one ignored.
_HANDLED = (x509.SubjectAlternativeName, x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage)


def _rule(rule: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{rule}: {message}", {"rule": rule})


@dataclass(frozen=True, slots=True)
class CertPolicy:
    """Limits on what ``cert.issue`` signs (see the module docstring)."""

    max_validity_days: int = 397
    default_validity_days: int = 90
    ca_validity_days: int = 3650
    allow_ca: bool = False
    max_path_length: int = 0
    san_types: tuple[str, ...] = ("dns", "ip", "uri")
    key_usages: tuple[str, ...] = ("digital_signature", "key_encipherment", "key_agreement")
    extended_key_usages: tuple[str, ...] = ("server_auth", "client_auth")
    expiry_warning_days: int = 30

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> CertPolicy:
        """Build the policy from ``[plugins.certificates]``.

        Raises:
            InvalidArgument: an unknown option or a value of the wrong type.
        """
        unknown = sorted(set(section) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidArgument(
                f"config: unknown option(s) in [plugins.certificates]: {', '.join(unknown)}"
            )
        values: dict[str, Any] = {}
        for name, raw in section.items():
            default = getattr(cls(), name)
            value = raw
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
                value = tuple(value) if ok else value
            if not ok:
                raise InvalidArgument(f"config: plugins.certificates.{name} has the wrong type")
            values[name] = value
        policy = cls(**values)
        for what, given, known in (
            ("san_types", policy.san_types, set(_SAN_TYPES.values())),
            ("key_usages", policy.key_usages, set(_KEY_USAGES)),
            ("extended_key_usages", policy.extended_key_usages, set(_EKUS)),
        ):
            bad = sorted(set(given) - known)
            if bad:
                raise InvalidArgument(f"config: plugins.certificates.{what}: unknown {', '.join(bad)}")
        if not 1 <= policy.default_validity_days <= policy.max_validity_days:
            raise InvalidArgument(
                "config: plugins.certificates.default_validity_days must be 1..max_validity_days"
            )
        return policy


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """What the inventory keeps about one issued certificate."""

    serial: str
    ca_key: str
    ca_version: int
    subject: str
    not_before: int
    not_after: int
    pem: str
    warned: bool = False

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "serial": self.serial,
                "ca_key": self.ca_key,
                "ca_version": self.ca_version,
                "subject": self.subject,
                "not_before": self.not_before,
                "not_after": self.not_after,
                "pem": self.pem,
                "warned": self.warned,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, body: bytes) -> IssuedCert:
        data = json.loads(body)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def to_wire(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "ca_key": self.ca_key,
            "ca_version": self.ca_version,
            "subject": self.subject,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "pem": self.pem,
        }


# --- DER surgery --------------------------------------------------------------------------


def _read_tlv(der: bytes, offset: int) -> tuple[int, int]:
    """(start of the value, end of the element) of the DER element at ``offset``."""
    length = der[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    end = start + length
    if end > len(der):
        raise ValueError("truncated DER")
    return start, end


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + value


def splice_signature(der: bytes, signature: bytes) -> bytes:
    """Replace the signature value of a DER ``Certificate`` (RFC 5280 §4.1) with ``signature``.

    ``Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }``:
    the first two elements are kept byte for byte.
    """
    if der[0] != 0x30:
        raise ValueError("not a DER certificate")
    body, end = _read_tlv(der, 0)
    _, tbs_end = _read_tlv(der, body)
    _, alg_end = _read_tlv(der, tbs_end)
    if alg_end >= end or der[alg_end] != 0x03:
        raise ValueError("not a DER certificate")
    # A BIT STRING's first content byte counts unused bits: signatures use whole bytes.
    return _tlv(0x30, der[body:alg_end] + _tlv(0x03, b"\x00" + signature))


# --- signing through the backend ---------------------------------------------------------------

_throwaway: dict[KeyType, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] = {}


async def _throwaway_key(key_type: KeyType) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """A key of the CA's type whose only use is to make cryptography produce a TBS.

    Its signatures are discarded, so one per type is kept for the process
    (an RSA-3072 key takes up to a second to generate).
    """
    found = _throwaway.get(key_type)
    if found is None:
        if key_type is KeyType.RSA_3072:
            found = await trio.to_thread.run_sync(
                lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072)
            )
        else:
            found = ec.generate_private_key(ec.SECP256R1())
        found = _throwaway.setdefault(key_type, found)
    return found


async def _sign_certificate(
    service: KeyService, ca: Key, version: int, builder: x509.CertificateBuilder
) -> bytes:
    """Sign ``builder``'s TBS with version ``version`` of the CA key, through the backend; DER."""
    throwaway = await _throwaway_key(ca.type)
    if ca.type is KeyType.RSA_3072:
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LEN)
        draft = builder.sign(throwaway, hashes.SHA256(), rsa_padding=pss)
    else:
        draft = builder.sign(throwaway, hashes.SHA256())
    used, signature = await service.sign(ca, draft.tbs_certificate_bytes, prehashed=False)
    if used != version:
        # The key rotated between reading its public key and signing.
        raise Unavailable(f"key {ca.name!r} rotated while signing; try again")
    return splice_signature(draft.public_bytes(serialization.Encoding.DER), signature)


def _ts(value: dt.datetime) -> int:
    return int(value.timestamp())


def _when(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _check_ca_key(ca: Key) -> None:
    if ca.type not in CA_TYPES:
        raise InvalidArgument(
            f"a CA key must be ecdsa-p256 or rsa-3072, not {ca.type.value}", {"field": "ca_key"}
        )


async def ca_certificate(service: KeyService, ca: Key, policy: CertPolicy) -> x509.Certificate:
    """The self-signed CA certificate of the CA key's primary version, made once and kept.

    Raises:
        InvalidArgument: not an ecdsa-p256 or rsa-3072 key.
        InvalidState: the key cannot sign (not active, compromised primary).
    """
    _check_ca_key(ca)
    version, pem = await service.public_pem(ca, None)
    doc_id = f"{ca.id.hex()}.{version}"
    now = service.now()
    stored = await service.store.get_document(CA_KIND, doc_id)
    if stored is not None:
        cert = x509.load_pem_x509_certificate(json.loads(stored)["pem"].encode())
        # Renewed while it can still sign a certificate of the longest validity
        # policy allows (a certificate may not outlive its CA certificate).
        if _ts(cert.not_valid_after_utc) > now + policy.max_validity_days * DAY:
            return cert
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, ca.name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keybroker"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - CLOCK_SKEW_S))
        .not_valid_after(_when(now + policy.ca_validity_days * DAY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage({"digital_signature", "key_cert_sign", "crl_sign"}), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    der = await _sign_certificate(service, ca, version, builder)
    cert = x509.load_der_x509_certificate(der)
    _verify(cert, cert)
    body = {"pem": cert.public_bytes(serialization.Encoding.PEM).decode(), "version": version}
    await service.store.put_document(CA_KIND, doc_id, json.dumps(body).encode())
    return cert


def _key_usage(flags: set[str]) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature="digital_signature" in flags,
        content_commitment="content_commitment" in flags,
        key_encipherment="key_encipherment" in flags,
        data_encipherment="data_encipherment" in flags,
        key_agreement="key_agreement" in flags,
        key_cert_sign="key_cert_sign" in flags,
        crl_sign="crl_sign" in flags,
        encipher_only=False,
        decipher_only=False,
    )


def _verify(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise Internal(
            f"a certificate signed through the backend does not verify ({type(exc).__name__})"
        ) from None


def _load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    if len(csr_pem) > MAX_CSR_CHARS:
        raise InvalidArgument("csr: too long", {"field": "csr"})
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii", "replace"))
    except ValueError:
        raise InvalidArgument("csr: not a PEM certificate signing request", {"field": "csr"}) from None
    if not csr.is_signature_valid:
        raise InvalidArgument("csr: its signature does not verify", {"field": "csr"})
    try:
        # Parsed lazily: a malformed or repeated extension first fails here.
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension):
        raise InvalidArgument("csr: an extension is malformed or repeated", {"field": "csr"}) from None
    _check_subject_key(csr.public_key())
    named = len(csr.subject) > 0 or any(isinstance(e.value, x509.SubjectAlternativeName) for e in extensions)
    if not named:
        raise InvalidArgument("csr: names no subject and no subject alternative name", {"field": "csr"})
    return csr


# Certificates start this long before they are made: a relying party whose
# clock runs a little slow would refuse one that starts "in the future".
CLOCK_SKEW_S: Final = 300
# Subject keys a certificate is issued for: nothing weaker than the CA's own.
MIN_RSA_BITS: Final = 2048
_CURVES: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def _check_subject_key(key: object) -> None:
    """Refuse a key no certificate should vouch for (RSA under 2048 bits or e != 65537, DSA, small curves)."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= MIN_RSA_BITS and key.public_numbers().e == 65537:
            return
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, _CURVES):
            return
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return
    raise InvalidArgument(
        "csr: the subject key must be RSA of 2048 bits or more (e = 65537), ECDSA P-256/384/521, "
        "Ed25519 or Ed448",
        {"field": "csr"},
    )


def _checked_extensions(
    csr: x509.CertificateSigningRequest, policy: CertPolicy
) -> list[tuple[x509.ExtensionType, bool]]:
    """The CSR's requested extensions that policy allows, each with its criticality.

    Raises:
        InvalidArgument: a request beyond policy, naming the rule
            (``certificates.san_types`` and so on).
    """
    chosen: list[tuple[x509.ExtensionType, bool]] = []
    requested = {type(ext.value): ext for ext in csr.extensions}
    for ext in csr.extensions:
        if not isinstance(ext.value, _HANDLED) and ext.critical:
            raise _rule(
                "certificates.extensions", f"critical extension {ext.oid.dotted_string} is not supported"
            )
    san = requested.get(x509.SubjectAlternativeName)
    if san is not None:
        assert isinstance(san.value, x509.SubjectAlternativeName)
        for general in san.value:
            kind = _SAN_TYPES.get(type(general))
            if kind is None or kind not in policy.san_types:
                raise _rule(
                    "certificates.san_types",
                    f"subject alternative names of type {kind or type(general).__name__} are not allowed",
                )
        chosen.append((san.value, len(csr.subject) == 0))
    constraints = requested.get(x509.BasicConstraints)
    is_ca, path_length = False, None
    if constraints is not None:
        assert isinstance(constraints.value, x509.BasicConstraints)
        is_ca, path_length = constraints.value.ca, constraints.value.path_length
        if is_ca and not policy.allow_ca:
            raise _rule(
                "certificates.allow_ca", "issued certificates may not be CAs (basicConstraints CA:true)"
            )
        if is_ca and (path_length is None or path_length > policy.max_path_length):
            raise _rule(
                "certificates.max_path_length",
                f"a CA certificate needs a path length of at most {policy.max_path_length}",
            )
    chosen.append((x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None), True))
    usage = requested.get(x509.KeyUsage)
    if usage is not None:
        assert isinstance(usage.value, x509.KeyUsage)
        flags = {name for name in _KEY_USAGES if getattr(usage.value, name)}
        allowed = set(policy.key_usages) | ({"key_cert_sign", "crl_sign"} if is_ca else set())
        refused = sorted(flags - allowed)
        if refused:
            raise _rule("certificates.key_usages", f"key usage(s) {', '.join(refused)} are not allowed")
        chosen.append((_key_usage(flags), True))
    eku = requested.get(x509.ExtendedKeyUsage)
    if eku is not None:
        assert isinstance(eku.value, x509.ExtendedKeyUsage)
        allowed_oids = {_EKUS[name] for name in policy.extended_key_usages}
        refused_oids = [oid.dotted_string for oid in eku.value if oid not in allowed_oids]
        if refused_oids:
            raise _rule(
                "certificates.extended_key_usages",
                f"extended key usage(s) {', '.join(refused_oids)} are not allowed",
            )
        chosen.append((eku.value, False))
    return chosen


async def issue_certificate(
    service: KeyService, ca: Key, csr_pem: str, validity_days: int | None, policy: CertPolicy
) -> tuple[x509.Certificate, IssuedCert]:
    """Sign a CSR with the CA key; keep it in the inventory.

    Args:
        service: signs through the CA key's backend and stores the record.
        ca: an ecdsa-p256 or rsa-3072 key (its primary version signs).
        csr_pem: a PEM PKCS#10 request with a valid self-signature.
        validity_days: lifetime; None for the policy default.
        policy: the limits.

    Returns:
        The certificate and its inventory record.

    Raises:
        InvalidArgument: malformed CSR, a CA key of another type, or a
            request beyond policy (details name the rule).
        InvalidState: the CA key cannot sign now.
    """
    _check_ca_key(ca)
    csr = _load_csr(csr_pem)
    days = policy.default_validity_days if validity_days is None else validity_days
    if not 1 <= days <= policy.max_validity_days:
        raise _rule(
            "certificates.max_validity_days", f"validity must be 1 to {policy.max_validity_days} days"
        )
    extensions = _checked_extensions(csr, policy)
    ca_cert = await ca_certificate(service, ca, policy)
    version, _ = await service.public_pem(ca, None)
    now = service.now()
    # The period is exactly `days` long, starting CLOCK_SKEW_S before now.
    not_before = now - CLOCK_SKEW_S
    not_after = not_before + days * DAY
    if not_after > _ts(ca_cert.not_valid_after_utc):
        raise _rule("certificates.max_validity_days", "the certificate would outlive its CA certificate")
    subject_key = csr.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(not_before))
        .not_valid_after(_when(not_after))
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
    )
    der = await _sign_certificate(service, ca, version, builder)
    cert = x509.load_der_x509_certificate(der)
    _verify(cert, ca_cert)
    record = IssuedCert(
        serial=f"{cert.serial_number:040x}",
        ca_key=ca.name,
        ca_version=version,
        subject=cert.subject.rfc4514_string(),
        not_before=_ts(cert.not_valid_before_utc),
        not_after=_ts(cert.not_valid_after_utc),
        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )
    await service.store.put_document(CERT_KIND, record.serial, record.to_json())
    return cert, record


async def list_certificates(
    service: KeyService,
    *,
    ca_key: str | None = None,
    expiring_within_s: int | None = None,
    after: str | None = None,
    limit: int = 100,
) -> tuple[list[IssuedCert], str | None]:
    """Issued certificates by serial, optionally of one CA key and/or expiring soon.

    Returns:
        Up to ``limit`` matching records and the cursor for the next page
        (None at the end).
    """
    now = service.now()
    found: list[IssuedCert] = []
    cursor = after
    while len(found) < limit:
        page = await service.store.list_documents(CERT_KIND, after=cursor, limit=max(limit, 100))
        for doc_id, body in page:
            cursor = doc_id
            record = IssuedCert.from_json(body)
            if ca_key is not None and record.ca_key != ca_key:
                continue
            if expiring_within_s is not None and record.not_after > now + expiring_within_s:
                continue
            found.append(record)
            if len(found) == limit:
                return found, doc_id
        if len(page) < max(limit, 100):
            return found, None
    return found, cursor


def policy_of(service: KeyService) -> CertPolicy:
    """The certificate policy of the broker the service belongs to."""
    return CertPolicy.from_config(service.plugins.config.section("certificates"))


async def certificates_to_warn(service: KeyService, window_s: int) -> list[IssuedCert]:
    """Issued certificates expiring within ``window_s`` (or expired) not yet announced."""
    now = service.now()
    due: list[IssuedCert] = []
    after: str | None = None
    while True:
        page = await service.store.list_documents(CERT_KIND, after=after, limit=500)
        for _, body in page:
            record = IssuedCert.from_json(body)
            if not record.warned and record.not_after <= now + window_s:
                due.append(record)
        if len(page) < 500:
            return due
        after = page[-1][0]


async def mark_warned(service: KeyService, record: IssuedCert) -> None:
    """Remember that ``record``'s expiry was announced."""
    await service.store.put_document(CERT_KIND, record.serial, replace(record, warned=True).to_json())
