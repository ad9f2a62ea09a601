"""In-process stand-ins for unit tests: an injected clock and site states."""
from __future__ import annotations

from typing import Any

from exporter.state import SiteState


class FakeClock:
    """The clock interface of exporter.state.SystemClock, moved by hand (``mono``, ``wall``)."""

    def __init__(self, mono: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.mono, self.wall = mono, wall

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def site_state(name: str = "s", state: str = "connected", enabled: bool = True,
               **fields: Any) -> SiteState:
    """A SiteState on 127.0.0.1:1883 (client ID ``<name>_itest``) with ``fields`` set."""
    s = SiteState(name=name, client_id=f"{name}_itest", broker="127.0.0.1:1883",
                  protocol="3.1.1", enabled=enabled, state=state if enabled else "disabled")
    for key, value in fields.items():
        setattr(s, key, value)
    return s
