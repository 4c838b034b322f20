"""Methods that move keys and vouch for them: export, import, backups, certificates.

``key.export`` / ``key.import_params`` / ``key.import`` carry key material
between keybroker and other parties under the RSA-AES key wrap of
:mod:`broker.transfer`; ``backup.create`` seals an archive of keys
(:mod:`broker.backup`); ``cert.*`` issue X.509 certificates signed by keys the
broker holds (:mod:`broker.certs`). docs/distribution.md has the formats.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from .backup import Passphrase, Protector, Recipient, collect_keys, create_backup
from .calls import KEY, NAME, PERIOD, USES, VERSION, Call, Kind, Method, as_key_name
from .certs import CERT_KIND, DAY, ca_certificate, issue_certificate, list_certificates, policy_of
from .errors import InvalidArgument, PermissionDenied
from .keys import Classification, KeyType, check_name
from .lifecycle import MAX_IMPORTED_VERSION
from .params import Field, as_bin, as_bool, as_enum, as_int, as_labels, as_str
from .store import check_document_ref
from .transfer import (
    WRAPPING_ALGORITHM,
    load_recipient,
    material_format,
    public_pem,
    recipient_fingerprint,
    wrap,
)

if TYPE_CHECKING:
    from .rpc import Dispatcher

__all__ = ["DISTRIBUTION_METHODS"]

KEY_ID_LEN = 16
# Audit records name a recipient by a fingerprint prefix: enough to tell
# recipients apart when reading the log, short enough to stay readable.
FINGERPRINT_CHARS = 16
# key.import options that only make sense when a new key is created.
_CREATE_OPTIONS = (
    "key_id",
    "protection",
    "classification",
    "rotation_period_s",
    "max_uses_per_version",
    "activate",
    "exportable",
    "labels",
)


def _as_key_id(name: str, value: Any) -> bytes:
    data = as_bin(name, value)
    if len(data) != KEY_ID_LEN:
        raise InvalidArgument(f"{name}: must be {KEY_ID_LEN} bytes", {"field": name})
    return data


async def _key_export(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    recipient = load_recipient(args["public_key"])
    key = await d.key_for(call, args["name"])
    call.details["exported"] = True
    call.details["recipient"] = recipient_fingerprint(recipient)[:FINGERPRINT_CHARS]
    number, material = await d.service.export_material(key, args.get("version"))
    call.version = number
    try:
        wrapped = wrap(recipient, material)
    finally:
        material[:] = bytes(len(material))
    return {
        "key": key.name,
        "key_id": key.id,
        "version": number,
        "type": key.type.value,
        "format": material_format(key.type),
        "algorithm": WRAPPING_ALGORITHM,
        "wrapped": wrapped,
    }


async def _key_import_params(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    d.authorize_no_key(call)
    key_type: KeyType = args["type"]
    token = await d.service.new_import_token(key_type, call.ctx.principal.name)
    call.details["type"] = key_type.value
    private = token.private
    return {
        "import_token": token.token,
        "public_key": public_pem(private.public_key()),
        "expires_at": token.expires_at,
        "algorithm": WRAPPING_ALGORITHM,
        "format": material_format(key_type),
    }


async def _key_import(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    name = args["name"]  # a key name: the NAME field checked it
    call.key = name
    call.details["origin"] = "external"
    key_type: KeyType = args["type"]
    if args["new_version"]:
        given = [option for option in _CREATE_OPTIONS if option in args]
        if given:
            raise InvalidArgument(
                f"{given[0]}: only for a new key, not with new_version", {"field": given[0]}
            )
        await d.key_for(call, name)
        token = d.service.import_tokens.take(args["import_token"], call.ctx.principal.name)
        call.details["new_version"] = True
        key = await d.service.import_version(
            name, token=token, wrapped=args["wrapped"], key_type=key_type, version=args.get("version")
        )
        return d.meta(call, key)
    if not d.allowed(call, name):
        raise PermissionDenied(f"{call.ctx.principal.name} may not key.import {name!r}")
    token = d.service.import_tokens.take(args["import_token"], call.ctx.principal.name)
    key = await d.service.import_key(
        token=token,
        wrapped=args["wrapped"],
        name=name,
        key_type=key_type,
        key_id=args.get("key_id"),
        version=args.get("version", 1),
        protection=args.get("protection", "software"),
        classification=args.get("classification", Classification.INTERNAL),
        activate=args.get("activate", True),
        rotation_period_s=args.get("rotation_period_s", 0),
        max_uses_per_version=args.get("max_uses_per_version"),
        exportable=args.get("exportable", False),
        labels=args.get("labels", {}),
    )
    return d.meta(call, key)


def _as_names(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{name}: must be an array of key names", {"field": name})
    return [check_name(item) for item in value]


async def _backup_create(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    recipient_pem, passphrase = args.get("recipient_public_key"), args.get("passphrase")
    if (recipient_pem is None) == (passphrase is None):
        raise InvalidArgument(
            "give exactly one of recipient_public_key and passphrase", {"field": "recipient_public_key"}
        )
    protector: Protector
    if isinstance(recipient_pem, str):
        protector = Recipient.from_pem(recipient_pem)
    else:
        protector = Passphrase(passphrase)
    d.authorize_no_key(call)
    names = args.get("names")
    if names is not None:
        keys = [await d.key_for(call, name) for name in dict.fromkeys(names)]
        call.key = keys[0].name if len(keys) == 1 else None
    else:
        keys = await collect_keys(d.service, None)
        for key in keys:
            if not d.allowed(call, key.name, key):
                # Not naming it: the caller may not even know the key exists.
                raise PermissionDenied(
                    f"{call.ctx.principal.name} may not back up every key; name the keys to back up"
                )
    out = io.BytesIO()
    summary = await create_backup(d.service, keys, protector, out, node=d.config.node)
    call.details["keys"] = summary.keys
    call.details["protector"] = "recipient" if isinstance(protector, Recipient) else "passphrase"
    return {
        "archive": out.getvalue(),
        "keys": summary.keys,
        "by_reference": list(summary.by_reference),
        "format": 1,
    }


async def _cert_ca(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    ca = await d.key_for(call, args["ca_key"])
    cert = await ca_certificate(d.service, ca, policy_of(d.service))
    version, _ = await d.service.public_pem(ca, None)
    call.version = version
    return {
        "ca_key": ca.name,
        "version": version,
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "not_after": int(cert.not_valid_after_utc.timestamp()),
    }


async def _cert_issue(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    ca = await d.key_for(call, args["ca_key"])
    policy = policy_of(d.service)
    _, record = await issue_certificate(d.service, ca, args["csr"], args.get("validity_days"), policy)
    call.version = record.ca_version
    call.details["serial"] = record.serial
    ca_cert = await ca_certificate(d.service, ca, policy)
    return {
        **record.to_wire(),
        "ca_pem": ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def _as_cert_cursor(name: str, value: Any) -> str:
    """A ``cursor`` that ``cert.list`` could have returned: a certificate's serial as stored."""
    cursor = as_str(name, value)
    try:
        check_document_ref(CERT_KIND, cursor)
    except ValueError:
        raise InvalidArgument(f"{name}: not a cursor cert.list returned", {"field": name}) from None
    return cursor


async def _cert_list(d: Dispatcher, call: Call, args: dict[str, Any]) -> Any:
    ca_name = args.get("ca_key")
    if ca_name is not None:
        await d.key_for(call, ca_name)
    else:
        d.authorize_no_key(call)
    days = args.get("expiring_within_days")
    records, cursor = await list_certificates(
        d.service,
        ca_key=ca_name,
        expiring_within_s=None if days is None else days * DAY,
        after=args.get("cursor"),
        limit=args["limit"],
    )
    visible = [r for r in records if ca_name is not None or d.allowed(call, r.ca_key, None, "cert.list")]
    call.details["count"] = len(visible)
    return {"certificates": [r.to_wire() for r in visible], "cursor": cursor}


DISTRIBUTION_METHODS: Mapping[str, Method] = {
    "key.export": Method(
        {"name": NAME, "version": VERSION, "public_key": Field(as_str, required=True)}, _key_export
    ),
    "key.import_params": Method({"type": Field(as_enum(KeyType), required=True)}, _key_import_params),
    "key.import": Method(
        {
            "import_token": Field(as_str, required=True),
            "wrapped": Field(as_bin, required=True),
            "name": NAME,
            "type": Field(as_enum(KeyType), required=True),
            "new_version": Field(as_bool, default=False),
            # Not up to 2^32 - 1: room is left for the key to go on rotating.
            "version": Field(as_int(1, MAX_IMPORTED_VERSION)),
            # Creation options; defaults are applied in the handler so that
            # giving them together with new_version can be refused.
            "key_id": Field(_as_key_id),
            "protection": Field(as_str),
            "classification": Field(as_enum(Classification)),
            "rotation_period_s": PERIOD,
            "max_uses_per_version": USES,
            "activate": Field(as_bool),
            "exportable": Field(as_bool),
            "labels": Field(as_labels),
        },
        _key_import,
        Kind.CHANGE,
    ),
    "backup.create": Method(
        {
            "names": Field(_as_names),
            "recipient_public_key": Field(as_str),
            "passphrase": Field(as_str),
        },
        _backup_create,
    ),
    "cert.ca": Method({"ca_key": KEY}, _cert_ca),
    "cert.issue": Method(
        {
            "ca_key": KEY,
            "csr": Field(as_str, required=True),
            "validity_days": Field(as_int(1, 100 * 366)),
        },
        _cert_issue,
    ),
    "cert.list": Method(
        {
            "ca_key": Field(as_key_name),
            "expiring_within_days": Field(as_int(0, 100 * 366)),
            "limit": Field(as_int(1, 1000), default=100),
            "cursor": Field(_as_cert_cursor),
        },
        _cert_list,
        Kind.READ,
    ),
}
