"""A real amqtt 0.12.1 broker (PyPI) for tests: a broker that never kicks a duplicate client ID.

amqtt lives in its own venv, ``.venv-amqtt`` at the repository root (``make test`` creates it:
``python3 -m venv .venv-amqtt && .venv-amqtt/bin/pip install amqtt==0.12.1``), so that its
dependencies never touch the project venv. ``AMQTT_BIN`` in the environment overrides the path.

What amqtt 0.12.1 does with two clients with one client ID (measured, and read in
``amqtt/broker.py``; ``tests/test_support.py`` holds the proof):

- MQTT 3.1.1 only (an MQTT 5 CONNECT gets no CONNACK).
- Clean session (our default): the second CONNECT deletes the first connection's *session*
  (its subscriptions and queues) but **keeps its socket open**: both clients stay connected,
  PINGREQs are answered, both can publish, and only the newest one receives messages. The
  old one is silently deaf. Nothing is logged at INFO level.
- Persistent session (clean session 0): the second CONNECT reuses the session and *does* take
  over: "Client <id> is already connected, performing take-over." and the old socket is
  closed.

Log (``amqtt.log``, stderr of ``amqtt -c conf.yaml``, ``[asctime] :: LEVEL - message``):
"Listener 'default' bind to 127.0.0.1:<port> ..." at start, "Connection from 127.0.0.1:<p>
on listener 'default'" per TCP accept. SIGTERM kills it at once (the script handles only
SIGINT, which shuts it down gracefully).
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from .net import HOST, REPO_ROOT
from .process import BrokerProcess

AMQTT_VERSION = "0.12.1"
AMQTT_MISSING = (
    f"amqtt {AMQTT_VERSION} not found: run `make test` (creates .venv-amqtt) or "
    f"`python3 -m venv .venv-amqtt && .venv-amqtt/bin/pip install amqtt=={AMQTT_VERSION}`"
)


def find_amqtt() -> str | None:
    """Path of the ``amqtt`` script of .venv-amqtt (or $AMQTT_BIN), None when absent."""
    env = os.environ.get("AMQTT_BIN")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT / ".venv-amqtt" / "bin" / "amqtt")
    for path in candidates:
        if os.access(path, os.X_OK):
            return str(path)
    return None


_RE_TAKEOVER = re.compile(r"Client (?P<id>.*) is already connected, performing take-over\.$", re.M)
_RE_ACCEPT = re.compile(r"Connection from \S+ on listener 'default'$", re.M)


class AmqttBroker(BrokerProcess):
    """amqtt on 127.0.0.1:<free port> in its own directory (conf.yaml, amqtt.log).

    The surface of :class:`~tests.support.broker.Broker` where it makes sense (start, stop,
    kill, freeze, restart, cleanup, log, ``takeovers``); no users (``credentials`` is None).
    SIGTERM kills amqtt at once; SIGINT is its graceful shutdown, so ``stop`` sends SIGINT.
    """

    name = "amqtt"
    stop_signal = signal.SIGINT
    credentials = None

    def __init__(self, directory: str | os.PathLike, port: int | None = None):
        binary = find_amqtt()
        if binary is None:
            raise RuntimeError(AMQTT_MISSING)
        super().__init__(binary, directory, port)
        self.conf_path = self.dir / "conf.yaml"
        self.log_path = self.output_path = self.dir / "amqtt.log"

    def start(self, timeout: float = 20.0) -> AmqttBroker:
        """Start amqtt (about 1 s: Python start-up and imports) and wait for its port."""
        return super().start(timeout)

    def _write_conf(self) -> None:
        self.conf_path.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: {HOST}:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.logging_amqtt.EventLoggerPlugin:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )

    def accepts(self) -> int:
        """TCP connections accepted so far (all runs), by the log."""
        return len(_RE_ACCEPT.findall(self.log_text()))

    def takeovers(self, client_id: str | None = None) -> int:
        """Take-overs amqtt logged (persistent sessions only; clean sessions never log one)."""
        return sum(1 for m in _RE_TAKEOVER.finditer(self.log_text())
                   if client_id in (None, m["id"]))

