"""Redact e-mail addresses, IP addresses and phone numbers before text reaches training.

Regexes only propose candidates; IP candidates are confirmed with the standard `ipaddress`
parser, so octets above 255, leading zeros and malformed IPv6 are left alone. Every pattern
refuses to start or end glued to a digit, letter or arithmetic operator, because the corpora
we train on (GSM8K first) are full of numbers: `16-3-4=9`, `<<500-250-1250=-1000>>`, prices
like `$1,234.50`, dates `2021-05-06` and times `12:30` must survive untouched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from pydantic import Field

from components.config import StrictConfig

EMAIL_TAG = "<EMAIL_ADDRESS>"
IP_TAG = "<IP_ADDRESS>"
PHONE_TAG = "<PHONE_NUMBER>"

# A simplified RFC 5322 address: dot-atom local part, dot-separated DNS labels, alphabetic TLD.
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w%+-]+(?:\.[\w%+-]+)*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)

# Dotted quad not inside a longer dotted/number run ("1.2.3.4.5" and "v1.2.3.4" are not IPs).
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")

# 2-8 colon-terminated groups of 0-4 hex digits and an optional hex or dotted-quad tail: covers
# full, "::"-compressed and IPv4-embedded forms (RFC 4291 §2.2); `ipaddress` decides validity.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,8}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)

# Characters that make a digit run part of a number, word or formula rather than a phone number.
_NOT_BEFORE = r"(?<![\w+$.,/\-=*<>@^])"
_NOT_AFTER = r"(?![\w\-=*/+<>%@^]|[.,]\d)"

# North American Numbering Plan: the area code starts with 2-9 (ATIS-0300115). The exchange
# is not restricted, because fictional and documentation numbers like "555-123-4567" are
# common and should be redacted too. Separators are required so plain 10-digit numbers stay.
_NANP_PHONE = re.compile(
    _NOT_BEFORE
    + r"(?:\+1[ .-]?|1[ .-])?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])\d{3}[ .-]\d{4}"
    + _NOT_AFTER
)

# International: "+", a country code, then 2-6 separated digit groups ("+44 20 7946 0958").
_INTERNATIONAL_PHONE = re.compile(
    _NOT_BEFORE + r"\+[1-9]\d{0,2}(?:[ .-]\(?\d{1,4}\)?){2,6}" + _NOT_AFTER
)

# ITU-T E.164: at most 15 digits including the country code; 8 excludes short arithmetic.
_E164_MIN_DIGITS = 8
_E164_MAX_DIGITS = 15


class PIIConfig(StrictConfig):
    enabled: bool = Field(True, description="Redact personal identifiers from the text.")
    emails: bool = Field(True, description=f"Replace e-mail addresses with {EMAIL_TAG}.")
    ip_addresses: bool = Field(True, description=f"Replace IPv4 and IPv6 addresses with {IP_TAG}.")
    phone_numbers: bool = Field(True, description=f"Replace North-American and +international phone numbers with {PHONE_TAG}.")


def _is_ipv4(candidate: str) -> bool:
    try:
        ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    return True


def _is_ipv6(candidate: str) -> bool:
    """Valid IPv6 with at least one digit: a bare "::" is far more often code or prose."""
    if candidate.strip(":") == "":
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_e164_length(candidate: str) -> bool:
    return _E164_MIN_DIGITS <= sum(char.isdigit() for char in candidate) <= _E164_MAX_DIGITS


def _always(candidate: str) -> bool:
    return True


def _redact(text: str, pattern: re.Pattern[str], tag: str, is_valid: Callable[[str], bool]) -> tuple[str, int]:
    replaced = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal replaced
        if not is_valid(match.group()):
            return match.group()
        replaced += 1
        return tag

    return pattern.sub(replace, text), replaced


def redact_pii(text: str, config: PIIConfig) -> tuple[str, dict[str, int]]:
    """Return the redacted text and how many of each kind were replaced.

    Order matters: e-mails first (their domain may look like anything), IPv6 before IPv4 (so
    "::ffff:192.0.2.1" is one address), phone numbers last. Count keys are the config field
    names and are always present (0 when a kind is disabled).
    """
    counts = {"emails": 0, "ip_addresses": 0, "phone_numbers": 0}
    if not config.enabled:
        return text, counts
    if config.emails:
        text, counts["emails"] = _redact(text, _EMAIL, EMAIL_TAG, _always)
    if config.ip_addresses:
        text, ipv6 = _redact(text, _IPV6, IP_TAG, _is_ipv6)
        text, ipv4 = _redact(text, _IPV4, IP_TAG, _is_ipv4)
        counts["ip_addresses"] = ipv6 + ipv4
    if config.phone_numbers:
        text, nanp = _redact(text, _NANP_PHONE, PHONE_TAG, _always)
        text, international = _redact(text, _INTERNATIONAL_PHONE, PHONE_TAG, _is_e164_length)
        counts["phone_numbers"] = nanp + international
    return text, counts
