"""How many telemetry messages per second the contract checks, two ways.

Compares, in the same run and on the same payloads, the validator the product
uses (fastjsonschema, compiled once) with the reference validator the tests
use (jsonschema's Draft202012Validator, built once). Three measurements:

- ``validate``: schema check of an already parsed message;
- ``decode``: what a receiver does per MQTT message: size check, strict
  JSON parse, schema check;
- ``encode``: what a sender does: strict serialisation, then the same checks.

Run: ``python bench/bench_schemas.py [--messages N] [--repeat R]``. Prints a
table and, with ``--json``, one JSON object for the docs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import jsonschema

import schemas
from schemas import Kind

SEED = 20250903


def sample_reports(count: int, seed: int = SEED) -> list[dict[str, Any]]:
    """Realistic, varied telemetry: 1 or 2 resources, optional load and model."""
    rng = random.Random(seed)
    reports = []
    for seq in range(count):
        resources = ["compute", "data"][: rng.randint(1, 2)]
        reports.append(
            schemas.telemetry(
                seq=seq,
                accuracy=rng.uniform(0.5, 0.95),
                local={name: rng.uniform(0, 2) for name in resources},
                cloud={name: rng.uniform(0, 1) for name in resources},
                epoch=rng.choice([None, rng.randint(0, 10_000)]),
                load=rng.uniform(0, 50) if rng.random() < 0.5 else None,
                model=rng.choice([None, "resnet18", "mobilenet_v3"]),
                ts=1_733_230_800 + seq,
            )
        )
    return reports


def rate(run: Callable[[], None], count: int, repeat: int) -> float:
    """Best-of-``repeat`` throughput of ``run`` (which handles ``count`` items)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


def measure(count: int, repeat: int) -> dict[str, dict[str, float]]:
    reports = sample_reports(count)
    payloads = [schemas.encode(Kind.TELEMETRY, report) for report in reports]
    fast = schemas.compiled(Kind.TELEMETRY)
    reference = jsonschema.Draft202012Validator(schemas.load_schema(Kind.TELEMETRY))

    def fast_validate() -> None:
        for report in reports:
            fast(report)

    def reference_validate() -> None:
        for report in reports:
            reference.validate(report)

    def fast_decode() -> None:
        for payload in payloads:
            schemas.decode(Kind.TELEMETRY, payload)

    def reference_decode() -> None:
        for payload in payloads:
            if len(payload) <= schemas.MAX_PAYLOAD_BYTES:
                reference.validate(json.loads(payload))

    def fast_encode() -> None:
        for report in reports:
            schemas.encode(Kind.TELEMETRY, report)

    return {
        "fastjsonschema": {
            "validate": rate(fast_validate, count, repeat),
            "decode": rate(fast_decode, count, repeat),
            "encode": rate(fast_encode, count, repeat),
        },
        "jsonschema": {
            "validate": rate(reference_validate, count, repeat),
            "decode": rate(reference_decode, count, repeat),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    results = measure(args.messages, args.repeat)
    if args.json:
        print(json.dumps({"python": platform.python_version(), **results}))
        return 0

    print(
        f"telemetry, {args.messages} messages, best of {args.repeat}, "
        f"Python {platform.python_version()} on {platform.machine()}"
    )
    print(f"{'validator':<16}{'validate/s':>14}{'decode/s':>14}{'encode/s':>14}")
    for name, row in results.items():
        cells = [
            f"{row[step]:>14,.0f}" if step in row else f"{'-':>14}"
            for step in ("validate", "decode", "encode")
        ]
        print(f"{name:<16}{''.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
