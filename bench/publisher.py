"""A fast MQTT 3.1.1 publisher on a raw socket, for the ingest benchmarks.

``python bench/publisher.py --port P [--rate R|0] [--count N] [--seconds S] ...``

Pre-encodes QoS 0 PUBLISH packets for ``--topics`` topics ``<prefix>/dev0001`` ... with the
JSON payload ``{"temperature":21.5,"humidity":40,"battery":{"level":88}}`` (values vary with
the topic and the round: ``--variants`` rounds are pre-encoded and cycled), then writes them
in ``--chunk``-message ``sendall`` batches, one round after the other (every topic once per
round, in topic order). ``--rate 0`` is unlimited; otherwise a token bucket checked before
every batch holds the average at ``--rate`` messages per second. Bounded by ``--count``
messages and ``--seconds`` of sending, whichever comes first.

Protocol with the parent (stdout, one JSON object per line):
``{"ready": true}`` once CONNACK has arrived, then it waits (at most ``--go-timeout`` s) for
one line on stdin before sending; at the end ``{"sent": n, "seconds": s, "rate": r,
"last": {topic: [temperature, humidity, battery_level]}}`` (the last values sent per topic)
and it disconnects cleanly. Only the standard library and the pure :mod:`exporter.wire`:
runs under any Python 3.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time

try:
    from exporter.wire import encode_varint as _varint
except ImportError:  # run as a script (``python bench/publisher.py``): add the repository
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from exporter.wire import encode_varint as _varint


def _str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def connect_packet(client_id: str, keepalive: int = 0) -> bytes:
    body = _str(b"MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big") + _str(client_id.encode())
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    body = _str(topic.encode()) + payload
    return b"\x30" + _varint(len(body)) + body


def values(topic_index: int, variant: int) -> tuple[float, int, int]:
    """(temperature, humidity, battery level) of topic ``topic_index`` in round ``variant``."""
    temperature = 15 + ((topic_index * 7 + variant * 3) % 200) / 10  # 15.0 .. 34.9, one decimal
    humidity = 30 + (topic_index + variant * 5) % 50
    level = 50 + (topic_index * 3 + variant) % 50
    return temperature, humidity, level


def payload(topic_index: int, variant: int) -> bytes:
    t, h, b = values(topic_index, variant)
    return f'{{"temperature":{t!r},"humidity":{h},"battery":{{"level":{b}}}}}'.encode()


def topic_name(prefix: str, i: int) -> str:
    return f"{prefix}/dev{i + 1:04d}"


def encode_rounds(prefix: str, topics: int, variants: int, chunk: int) -> list[list[bytes]]:
    """rounds[v] = the round's packets joined into chunks of ``chunk`` messages."""
    rounds = []
    for v in range(variants):
        packets = [publish_packet(topic_name(prefix, i), payload(i, v)) for i in range(topics)]
        rounds.append([b"".join(packets[k:k + chunk]) for k in range(0, topics, chunk)])
    return rounds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", default="bench/sensors")
    p.add_argument("--topics", type=int, default=1000)
    p.add_argument("--variants", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = unlimited")
    p.add_argument("--count", type=int, default=1_000_000, help="stop after this many messages")
    p.add_argument("--seconds", type=float, default=10.0, help="stop after this long")
    p.add_argument("--chunk", type=int, default=100, help="messages per sendall")
    p.add_argument("--go-timeout", type=float, default=60.0)
    p.add_argument("--no-wait", action="store_true", help="start at once, no GO line")
    args = p.parse_args(argv)
    if args.topics < 1 or args.chunk < 1 or args.variants < 1 or args.count < 0:
        p.error("--topics, --chunk, --variants must be >= 1 and --count >= 0")
    chunk = min(args.chunk, args.topics)
    rounds = encode_rounds(args.prefix, args.topics, args.variants, chunk)
    per_chunk = [min(chunk, args.topics - k) for k in range(0, args.topics, chunk)]

    sock = socket.create_connection((args.host, args.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.sendall(connect_packet(f"bench-pub-{os.getpid()}"))
    connack = b""
    while len(connack) < 4:
        got = sock.recv(4 - len(connack))
        if not got:
            print(json.dumps({"error": "broker closed before CONNACK"}), flush=True)
            return 1
        connack += got
    if connack[0] != 0x20 or connack[3] != 0:
        print(json.dumps({"error": f"CONNACK refused: {connack.hex()}"}), flush=True)
        return 1
    print(json.dumps({"ready": True}), flush=True)
    if not args.no_wait:
        r, _, _ = select.select([sys.stdin], [], [], args.go_timeout)
        if not r or not sys.stdin.readline():
            print(json.dumps({"error": "no GO line"}), flush=True)
            return 1

    sent = 0
    variant = 0
    last_variant_round = -1  # rounds fully sent: the last complete round's variant
    partial = 0              # topics sent of the round in progress
    rate = args.rate
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    stop = False
    while not stop:
        batches = rounds[variant % args.variants]
        partial = 0
        for data, n in zip(batches, per_chunk):
            if sent + n > args.count:
                stop = True
                break
            now = time.monotonic()
            if now >= deadline:
                stop = True
                break
            if rate > 0:
                due = t0 + sent / rate  # the token bucket: this batch may start at ``due``
                if due > now:
                    time.sleep(due - now)
            sock.sendall(data)
            sent += n
            partial += n
        if not stop:
            last_variant_round = variant
            variant += 1
    elapsed = time.monotonic() - t0
    try:
        sock.sendall(b"\xe0\x00")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(4096):
            pass
    except OSError:
        pass
    finally:
        sock.close()
    # last values: topics < partial got round ``variant``, the others the last complete one
    last = {}
    for i in range(args.topics):
        v = variant if i < partial else last_variant_round
        if v >= 0:
            last[topic_name(args.prefix, i)] = list(values(i, v % args.variants))
    print(json.dumps({"sent": sent, "seconds": round(elapsed, 4),
                      "rate": round(sent / elapsed, 1) if elapsed > 0 else None,
                      "last": last}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
