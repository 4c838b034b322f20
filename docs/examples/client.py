"""An application talking to its keybroker sidecar with broker.client.

Assumes the keys ``myapp/records`` (aes256-gcm) and ``myapp/webhooks``
(hmac-sha256) exist and that this process's uid holds the ``app`` role on
``myapp/*`` (docs/examples/app-policy.toml). An operator creates them once:

    sudo -u keybroker keybroker --socket /run/keybroker/keybroker.sock \\
        key create myapp/records --type aes256-gcm --rotation-period 90d

Run: ``KEYBROKER_SOCKET=/run/keybroker/keybroker.sock python client.py``
"""

from __future__ import annotations

import os
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.client import Client
from broker.errors import BrokerError, DecryptionFailed, PermissionDenied

SOCKET = os.environ.get("KEYBROKER_SOCKET", "/run/keybroker/keybroker.sock")


def main() -> None:
    # One client per process is enough: it reconnects by itself, and calls
    # from several threads queue on its one connection (use AsyncClient
    # under trio to pipeline).
    with Client(SOCKET, timeout=10) as kb:
        print("connected as", kb.whoami()["principal"])

        # 1. Small secrets: the broker encrypts. The aad binds a ciphertext
        #    to its row, so it cannot be pasted into another row.
        card = b"4111 1111 1111 1111"
        sealed = kb.encrypt("myapp/records", card, aad=b"customer:42")
        stored = sealed["ciphertext"]  # bytes: store them as they are
        opened = kb.decrypt(stored, aad=b"customer:42")
        assert opened["plaintext"] == card
        try:
            kb.decrypt(stored, aad=b"customer:43")
        except DecryptionFailed:
            print("a ciphertext moved to another row does not open")

        # 2. Many at once: one round trip, one use counted per item.
        batch = kb.encrypt_batch("myapp/records", [b"a", b"b", b"c"], aad=b"import:7")
        back = kb.decrypt_batch(batch["ciphertexts"], aad=b"import:7")
        assert back["plaintexts"] == [b"a", b"b", b"c"] and back["errors"] == [None] * 3

        # 3. Large data: envelope encryption with a data key. The file never
        #    goes to the broker; only the 32-byte data key is wrapped there.
        data = secrets.token_bytes(1 << 20)
        dk = kb.datakey("myapp/records", aad=b"backup:2024-06-01")["keys"][0]
        nonce = secrets.token_bytes(12)
        blob = nonce + AESGCM(dk["plaintext"]).encrypt(nonce, data, None)
        wrapped = dk["wrapped"]  # keep next to the blob; drop the plaintext key
        # Later: unwrap the data key through the broker, decrypt locally.
        key = kb.decrypt(wrapped, aad=b"backup:2024-06-01")["plaintext"]
        assert AESGCM(key).decrypt(blob[:12], blob[12:], None) == data
        print(f"envelope-encrypted {len(data)} bytes with a wrapped data key")

        # 4. MACs, e.g. for webhook payloads.
        payload = b'{"event": "paid", "order": 42}'
        tag = kb.mac("myapp/webhooks", payload)["mac"]
        assert kb.verify_mac("myapp/webhooks", payload, tag)["valid"]

        # 5. Errors are typed; each carries the protocol's code.
        try:
            kb.key_rotate("myapp/records")  # the app role cannot change keys
        except PermissionDenied as exc:
            print("refused:", exc.code)
        except BrokerError as exc:
            print("unexpected:", exc.code, exc.message)
            raise


if __name__ == "__main__":
    main()
