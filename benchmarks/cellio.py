"""The worker protocol: a JSON spec on stdin, one `RESULT {json}` line per sample on stdout."""

from __future__ import annotations

import json
import sys

MARK = "RESULT "


def read_spec() -> dict:
    return json.load(sys.stdin)


def emit(record: dict) -> None:
    print(MARK + json.dumps(record), flush=True)


def parse(stdout: str) -> list[dict]:
    return [json.loads(line[len(MARK):]) for line in stdout.splitlines() if line.startswith(MARK)]
