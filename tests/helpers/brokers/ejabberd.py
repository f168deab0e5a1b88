"""ejabberd's mod_mqtt (MQTT 5 and 3.1.1): a private, non-distributed Erlang node in a temporary folder.

The node is started with `erl` directly (not ejabberdctl, which switches to the ejabberd user and reads
/etc/ejabberd): its config, Mnesia spool and logs are in the fixture's folder, and without a node name
it needs no epmd. Clients log in with any user name (anonymous `login_anon`); mod_mqtt refuses a
CONNECT without one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers.brokers.base import BrokerProcess, debian_version

LIBS = Path("/usr/lib/x86_64-linux-gnu")


def _libs() -> Path | None:
    """Where Debian put ejabberd's Erlang applications (the folder holding ejabberd-<version>)."""
    for root in (LIBS, *Path("/usr/lib").glob("*-linux-gnu*")):
        if any(root.glob("ejabberd-*/ebin/ejabberd.app")):
            return root
    return None


class Ejabberd(BrokerProcess):
    name = "ejabberd"
    username = "edge"
    password = "edge"

    @classmethod
    def missing(cls) -> str | None:
        if shutil.which("erl") is None or _libs() is None:
            return "ejabberd is not installed (scripts/test.sh installs it with apt-get)"
        return None

    @classmethod
    def version(cls) -> str:
        return debian_version("ejabberd") or "unknown"

    def prepare(self) -> None:
        (self.workdir / "spool").mkdir(exist_ok=True)
        (self.workdir / "ejabberd.yml").write_text(
            'hosts: ["localhost"]\n'
            "loglevel: warning\n"
            "log_rotate_count: 0\n"
            "auth_method: [anonymous]\n"
            "anonymous_protocol: login_anon\n"
            "allow_multiple_connections: true\n"
            "listen:\n"
            f"  - port: {self.port}\n"
            '    ip: "127.0.0.1"\n'
            "    module: mod_mqtt\n"
            "modules:\n"
            "  mod_mqtt: {}\n"
        )

    def command(self) -> list[str]:
        return ["erl", "-noshell", "-noinput", "-mnesia", "dir", f'"{self.workdir / "spool"}"', "-s", "ejabberd"]

    def environment(self) -> dict[str, str]:
        d = self.workdir
        return {
            "HOME": str(d),
            "ERL_LIBS": str(_libs()),
            "EJABBERD_CONFIG_PATH": str(d / "ejabberd.yml"),
            "EJABBERD_LOG_PATH": str(d / "ejabberd.log"),
            "ERL_CRASH_DUMP": str(d / "erl_crash.dump"),
        }
