"""Read an offline W&B run file (``<run dir>/wandb/offline-run-*/run-*.wandb``) back, for tests.

wandb 0.31 ships no Python reader for these files any more (``wandb.sdk.internal.datastore`` is
gone; only the Go ``wandb sync`` reads them), so this decodes them with wandb's own protobuf
schema (``wandb.proto.wandb_internal_pb2.Record``). The framing is LevelDB's log format: a 7-byte
file header (``:W&B`` magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last; 0 is block padding).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    """Every record of the file, in order (``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    out, pos, pending = [], HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # the rest of a block too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk, pos = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length], pos + CHUNK_HEADER + length
        if kind == 0:
            pos += room - CHUNK_HEADER - length
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def flush() -> None:
    """Make every run of this process complete on disk before it is read: wandb-core writes the
    run file asynchronously, and ``run.finish()`` may return before the last records are written
    (measured with wandb 0.31: 7 bytes right after ``finish``, the whole file a moment later).
    Tearing W&B's service down writes everything; the next ``wandb.init`` starts a new one."""
    import wandb

    wandb.teardown()


def run_file(run_dir: str | Path) -> Path:
    """The one offline W&B run file of a run directory (an error if there are several)."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    return path


def of_type(recs: list, kind: str) -> list:
    """The payloads of the records of one type (``"history"``, ``"summary"``, ``"metric"``, ...)."""
    return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]


def _name(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def config(recs: list) -> dict[str, Any]:
    """The run's config (from the run record and later config updates), top-level keys decoded."""
    result: dict[str, Any] = {}
    for payload in [r.config for r in of_type(recs, "run")] + of_type(recs, "config"):
        for item in payload.update:
            result[_name(item)] = json.loads(item.value_json)
        for item in payload.remove:
            result.pop(_name(item), None)
    return result


def summary(recs: list) -> dict[str, Any]:
    """The run's final summary: every summary update applied in order (W&B's ``_wandb`` left out)."""
    result: dict[str, Any] = {}
    for payload in of_type(recs, "summary"):
        for item in payload.update:
            result[_name(item)] = json.loads(item.value_json)
        for item in payload.remove:
            result.pop(_name(item), None)
    return {k: v for k, v in result.items() if not k.startswith("_wandb")}


def history(recs: list) -> list[dict[str, Any]]:
    """One dict per logged history row (``_step``, ``_runtime``, ... included)."""
    return [{_name(item): json.loads(item.value_json) for item in h.item} for h in of_type(recs, "history")]


def metrics(recs: list) -> dict[str, Any]:
    """``define_metric`` records by name (or glob): ``{"train/*": MetricRecord, ...}``."""
    return {m.name or m.glob_name: m for m in of_type(recs, "metric")}


def saved_files(recs: list) -> list[str]:
    """The paths of the files attached to the run (``run.save``), W&B's own included."""
    return [f.path for payload in of_type(recs, "files") for f in payload.files]


def exit_code(recs: list) -> int | None:
    """The exit code of the exit record that ``run.finish`` writes (None if the run was never closed)."""
    codes = [e.exit_code for e in of_type(recs, "exit")]
    return codes[-1] if codes else None
