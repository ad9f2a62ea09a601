#!/usr/bin/env python3
"""Publish simulated sensor readings for a few sites to a local MQTT broker.

    python scripts/simulate_sites.py --port 18830 --sites site_88,site_42
    python scripts/simulate_sites.py --port 18830 --sites-file examples/sites.yml

Every --interval seconds, for each site and each of --devices devices, publishes
    <site>/sensors/<device>  {"temperature": 21.5, "humidity": 40, "battery": {"level": 88}}
with slowly drifting values. Only loopback brokers are accepted. Stops on
SIGINT/SIGTERM, or after --count rounds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import signal
import sys
import threading

import paho.mqtt.client as mqtt


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def sites_from_file(path: str) -> list[str]:
    """Names of the enabled sites in a sites YAML (a list, or a {sites: [...]} mapping)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    entries = data.get("sites", []) if isinstance(data, dict) else data
    if isinstance(entries, dict):  # {name: {...}} form
        entries = [dict(v or {}, name=k) for k, v in entries.items()]
    return [e["name"] for e in entries if e.get("enabled", True)]


class Device:
    """A sensor whose readings wander slowly within plausible bounds."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.temperature = rng.uniform(18.0, 24.0)
        self.humidity = rng.uniform(35.0, 55.0)
        self.battery = rng.uniform(60.0, 100.0)

    def reading(self) -> dict:
        r = self.rng
        self.temperature = min(35.0, max(10.0, self.temperature + r.uniform(-0.2, 0.2)))
        self.humidity = min(90.0, max(10.0, self.humidity + r.uniform(-0.5, 0.5)))
        self.battery -= r.uniform(0.0, 0.05)
        if self.battery < 5.0:  # "recharged"
            self.battery = 100.0
        return {
            "temperature": round(self.temperature, 1),
            "humidity": round(self.humidity),
            "battery": {"level": round(self.battery)},
        }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="loopback broker host")
    p.add_argument("--port", type=int, default=1883)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sites", help="comma-separated site names")
    src.add_argument("--sites-file", help="sites YAML; its enabled sites are simulated")
    p.add_argument("--devices", type=int, default=3, help="devices per site")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between rounds")
    p.add_argument("--count", type=int, default=0, help="stop after N rounds (0: run until signalled)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=0)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible values")
    args = p.parse_args(argv)
    if not is_loopback(args.host):
        p.error(f"refusing non-loopback host {args.host!r}: only 127.0.0.0/8, ::1 or localhost")
    if args.devices < 1 or args.interval <= 0 or args.count < 0:
        p.error("--devices must be >= 1, --interval > 0, --count >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = sites_from_file(args.sites_file) if args.sites_file else [
        s.strip() for s in args.sites.split(",") if s.strip()]
    if not names:
        print("simulate_sites: no sites to simulate", file=sys.stderr)
        return 1

    rng = random.Random(args.seed)
    devices = {(site, f"dev{i}"): Device(rng) for site in names for i in range(1, args.devices + 1)}

    stop = threading.Event()
    connected = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"site-simulator-{rng.getrandbits(32):08x}")

    def on_connect(_c, _u, _flags, reason_code, _props):
        if reason_code.is_failure:
            print(f"simulate_sites: connect refused: {reason_code}", file=sys.stderr)
        else:
            connected.set()

    def on_disconnect(_c, _u, _flags, reason_code, _props):
        connected.clear()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect_async(args.host, args.port, keepalive=30)
    client.loop_start()  # retries the first connection until it succeeds
    try:
        if not connected.wait(args.connect_timeout):
            print(f"simulate_sites: no connection to {args.host}:{args.port} "
                  f"within {args.connect_timeout:g}s", file=sys.stderr)
            return 1
        print(f"simulate_sites: publishing for {', '.join(names)} "
              f"({args.devices} devices each) to {args.host}:{args.port}", file=sys.stderr, flush=True)
        rounds = sent = 0
        while not stop.is_set():
            infos = [client.publish(f"{site}/sensors/{dev}", json.dumps(device.reading()), qos=args.qos)
                     for (site, dev), device in devices.items()]
            sent += sum(i.rc == mqtt.MQTT_ERR_SUCCESS for i in infos)
            rounds += 1
            if args.count and rounds >= args.count:
                for info in infos:  # flush the last round before disconnecting
                    if info.rc == mqtt.MQTT_ERR_SUCCESS:
                        info.wait_for_publish(timeout=2)
                break
            stop.wait(args.interval)
        print(f"simulate_sites: stopped after {rounds} rounds, {sent} messages", file=sys.stderr)
        return 0
    finally:
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
