"""The key that signs deployment orders, checked against the registry's keys document before anything is signed.

Since signing roles (docs/trust.md), devices trust an order only when it is signed by a key that the
registry's newest root (`keys/root.json`) names for the `orders` role, and not expired or revoked. A key
that is not one of those (the old single registry key, a manifests key, a revoked one) would write orders
that every device refuses, one `deploy.refused` event each: `fleet deploy` and `fleet controller` refuse
it up front, in one line, when they are told where the registry is (`--registry`, a folder or a URL).

The keys document is read, not verified: this is the operator's own check of their own key, and the
devices verify the root chain themselves. A registry without keys/ is a single-key registry (devices
trust the key they pinned: nothing to check); one that cannot be reached gives a warning, not a
refusal (the controller must start while the registry's web server is down).
"""

from __future__ import annotations

import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.fleet.client import FleetError
from agent.models.fetch import Fetcher, FetchError, MissingError, RefusalError
from agent.models.signing import key_id
from agent.models.trust import LATEST, Root, TrustError, parse_root

TIMEOUT = 10.0  # seconds for the keys document


def _root_document(registry: str) -> tuple[bytes | None, str]:
    """(keys/root.json's bytes or None when the registry has none, where it was read)."""
    if urlsplit(registry).scheme in ("http", "https"):
        where = registry.rstrip("/") + "/" + LATEST
        with tempfile.TemporaryDirectory(prefix="edge-agent-keys-") as cache:
            fetcher = Fetcher(registry, Path(cache), timeout=TIMEOUT, retries=0, backoff=1.0, sleep=time.sleep)
            try:
                return fetcher.document(LATEST), where
            except MissingError:
                return None, where
    path = Path(registry) / LATEST
    if not Path(registry).is_dir():
        raise FleetError(f"--registry: {registry}: no such folder (expected a registry folder or an http(s) URL)", 2)
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        return None, str(path)


def check_order_key(registry: str, private: Ed25519PrivateKey, now: datetime | None = None) -> str | None:
    """Refuse (FleetError, code 2) a key the registry's newest root does not trust for orders now.
    Returns a warning line when the registry cannot be read (nothing is refused then), else None."""
    try:
        data, where = _root_document(registry)
    except (FetchError, RefusalError, OSError) as exc:
        return f"cannot read the registry's keys document to check --key ({exc}); orders are signed unchecked"
    if data is None:
        return None  # a single-key registry: devices trust the key they pinned
    try:
        root: Root = parse_root(data, where)
    except TrustError as exc:
        raise FleetError(f"--registry: {exc}", 2) from None
    kid = key_id(private.public_key())
    ring = root.keyring("orders", now or datetime.now(timezone.utc))
    if kid in ring:
        return None
    why = ring.retired.get(kid, "which it does not know")
    raise FleetError(
        f"--key: key {kid} is not an orders key of {where} (root version {root.version}): {why}; every device "
        f"would refuse the orders it signs; orders keys: {', '.join(ring) or 'none'} (docs/trust.md)",
        2,
    )
