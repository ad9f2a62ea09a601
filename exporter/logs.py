"""Logging set-up: plain text or one JSON object per line (LOG_FORMAT=json)."""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and site when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        site = getattr(record, "site", None)
        if site is not None:
            entry["site"] = site
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class SiteTextFormatter(logging.Formatter):
    """Text lines, with ``[site]`` after the logger name when the record has a site."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        site = getattr(record, "site", None)
        if site is not None:
            line = line.replace(f"{record.name}: ", f"{record.name} [{site}]: ", 1)
        return line


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else SiteTextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("paho").setLevel(logging.WARNING)
