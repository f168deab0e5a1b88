"""A refused connection in one line a human can act on: which setting to look at, and why.

The broker refuses in CONNACK (MQTT 5 reason codes; 3.1.1 return codes are mapped onto them), and the TLS
layer refuses in the handshake: our side does not trust the broker's certificate, or the broker does not
take ours (which paho only reports in its log, before any CONNACK).
"""

from __future__ import annotations

import ssl

# CONNACK reason codes that a human has to fix.
_HINTS = {
    0x84: "the broker does not support this MQTT version",
    0x85: "the broker rejected the client id (mqtt.client_id)",
    0x86: "bad user name or password (mqtt.username, mqtt.password_file)",
    # Mosquitto answers a wrong password with 0x87 too.
    0x87: "not authorised (check mqtt.username and mqtt.password_file, and the broker's ACL for this user)",
    0x8A: "this client is banned by the broker",
    0x8C: "bad authentication method",
}
_V311_TO_V5 = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}
UNSUPPORTED_PROTOCOL = 0x84
# A broker that keeps no retained messages, or takes QoS 0 only, refuses a Will that asks for them.
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B


def connack_code(value: int, mqtt5: bool) -> int:
    """The MQTT 5 reason code of a CONNACK (a 3.1.1 return code mapped onto it)."""
    return value if mqtt5 else _V311_TO_V5.get(value, value)


def connack_refusal(code: int, reason: object) -> str:
    return f"the broker refused the connection: {_HINTS.get(code, str(reason))} (reason {code:#04x} {reason})"


def untrusted_broker(exc: ssl.SSLCertVerificationError) -> str:
    return (
        f"TLS: the broker's certificate is not trusted: {exc.verify_message or exc} "
        "(mqtt.tls.ca must be the CA that signed it, and the URL host must match it)"
    )


def handshake_failed(exc: ssl.SSLError) -> str:
    reason = exc.reason.replace("_", " ").lower() if getattr(exc, "reason", None) else str(exc)
    return f"TLS handshake failed: {reason}{_cert_hint(str(exc))}"


def rejected_certificate(paho_log: str) -> str | None:
    """The broker rejected this device's certificate, if paho's last error line says so."""
    if "SSL" in paho_log or "alert" in paho_log.lower():
        return f"TLS: the broker rejected this device's certificate: {paho_log}{_cert_hint(paho_log)}"
    return None


def _cert_hint(text: str) -> str:
    lowered = text.lower()
    if (
        "unknown ca" in lowered
        or "bad certificate" in lowered
        or "certificate required" in lowered
        or "certificate unknown" in lowered
    ):
        return " (mqtt.tls.cert must be signed by a CA the broker trusts, and tls.key must match it)"
    return ""
