"""A strict reader of RFC 5424 syslog messages, for tests that check what keybroker sends."""

from __future__ import annotations

import re

__all__ = ["MESSAGE", "parse_sd", "split_sd"]

# RFC 5424 §6: HEADER SP STRUCTURED-DATA [SP MSG]
MESSAGE = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    rb"(?P<rest>\[.*)",
    re.DOTALL,
)


def parse_sd(sd: str) -> dict[str, dict[str, str]]:
    """The structured data at the start of ``sd`` (see :func:`split_sd`)."""
    return split_sd(sd)[0]


def split_sd(sd: str) -> tuple[dict[str, dict[str, str]], str | None]:
    """A strict RFC 5424 §6.3 structured-data parser (escapes included); returns (SD, MSG)."""
    elements: dict[str, dict[str, str]] = {}
    pos = 0
    while pos < len(sd) and sd[pos] != " ":
        assert sd[pos] == "[", sd[pos:]
        match = re.compile(r"([^ =\]\"]+)").match(sd, pos + 1)
        assert match
        sd_id, pos = match.group(1), match.end()
        params: dict[str, str] = {}
        while sd[pos] == " ":
            name_match = re.compile(r'([^ =\]"]{1,32})="').match(sd, pos + 1)
            assert name_match, sd[pos:]
            pos = name_match.end()
            value: list[str] = []
            while sd[pos] != '"':
                if sd[pos] == "\\" and sd[pos + 1] in '"\\]':
                    value.append(sd[pos + 1])
                    pos += 2
                else:
                    assert sd[pos] not in '"]', "unescaped special character"
                    value.append(sd[pos])
                    pos += 1
            params[name_match.group(1)] = "".join(value)
            pos += 1
        assert sd[pos] == "]"
        pos += 1
        elements[sd_id] = params
    return elements, sd[pos + 1 :] if pos < len(sd) else None
