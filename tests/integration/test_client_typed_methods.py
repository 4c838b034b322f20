"""The typed client methods for distribution, certificates and the report,
over a real socket (the RPC behaviour itself is tested in tests/distribution)."""

from __future__ import annotations

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from broker.client import Client
from broker.errors import PermissionDenied
from broker.server import ServerInfo
from broker.transfer import unwrap


def typed_calls(path: str) -> None:
    recipient = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    public_pem = recipient.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with Client(path) as kb:
        kb.key_create("t/export", "aes256-gcm", exportable=True)
        kb.key_create("t/locked", "aes256-gcm")
        exported = kb.key_export("t/export", public_pem)
        assert len(unwrap(recipient, exported["wrapped"])) == 32
        with pytest.raises(PermissionDenied):
            kb.key_export("t/locked", public_pem)
        params = kb.key_import_params("aes256-gcm")
        assert params["import_token"] and "BEGIN PUBLIC KEY" in params["public_key"]

        kb.key_create("t/ca", "ecdsa-p256")
        ca = x509.load_pem_x509_certificate(kb.cert_ca("t/ca")["pem"].encode())
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.example")]))
            .sign(leaf_key, hashes.SHA256())
        )
        issued = kb.cert_issue("t/ca", csr.public_bytes(serialization.Encoding.PEM).decode(), 30)
        x509.load_pem_x509_certificate(issued["pem"].encode()).verify_directly_issued_by(ca)
        assert [c["serial"] for c in kb.cert_list("t/ca")["certificates"]] == [issued["serial"]]
        assert kb.report()["summary"]["keys"] == 3
        archive = kb.backup_create(passphrase="correct horse battery staple")
        assert archive["keys"] == 3


async def test_typed_methods(served: ServerInfo) -> None:
    await trio.to_thread.run_sync(typed_calls, str(served.socket_path))
