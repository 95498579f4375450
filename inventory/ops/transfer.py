"""``inventory import`` and ``inventory export``: stock rows in CSV or JSON lines, through
the HTTP API (:mod:`inventory.client`), in bounded memory.

Import reads the file as a stream and sends it in batches of 1,000 sets through
``POST /v1/stock/bulk`` (one transaction per batch on the server), with up to
``concurrency`` batches in flight (default 4; the request round trip, not PostgreSQL,
bounds one batch at a time). Policy:

- file order per row: a batch that names a (product, warehouse) of a batch still in
  flight waits for it (and the ones before it) first, so a row named twice ends with its
  later value and its ledger entries in file order; rows of different keys may apply in
  any order, which changes nothing since each sets an absolute quantity;
- results in line order: batches finish in the order they were read, so row errors are
  printed by ascending line number, as with one batch at a time;
- bounded memory: at most ``concurrency + 1`` batches (in flight and being read),
  whatever the file's size.

A row that cannot be read or that the server refuses is reported on standard error with
its file line number (the header is line 1) and the import goes on; the exit status is 1
when any row failed. A batch the server refuses as a whole, or a server that cannot be
reached, stops the import (:class:`TransferError`); batches already sent stay applied.

Formats (chosen by ``--format``, else by the file name: ``.jsonl``/``.ndjson`` are JSON
lines, anything else CSV):

- CSV with a header naming ``product_id``, ``warehouse_id``, ``quantity`` and optionally
  ``reason``; the columns ``reserved``, ``available``, ``version`` and ``updated_at``
  that ``export`` writes are accepted and ignored, so an export imports back;
- JSON lines: one object per line with the same keys.

Export pages through ``GET /v1/products`` (1,000 products per request) and writes every
stock row as it arrives.
"""

from __future__ import annotations

import csv
import io
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import msgspec
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..client import ApiError, BulkItem, BulkResult, Client, Level
from ..domain.model import is_product_id, is_warehouse_id

__all__ = ["ImportSummary", "TransferError", "export_rows", "import_file"]

BATCH = 1000
CONCURRENCY = 4
COLUMNS = ("product_id", "warehouse_id", "quantity")
EXPORT_COLUMNS = (*COLUMNS, "reserved", "available", "version", "updated_at")
IGNORED = frozenset({"reserved", "available", "version", "updated_at"})
MAX_STOCK = 1_000_000_000


class TransferError(Exception):
    """The file or the server cannot be used at all (reported as one line, exit 1)."""


@dataclass
class ImportSummary:
    rows: int = 0  # data rows read (the header not counted)
    imported: int = 0  # applied, including sets to the quantity a row already had
    failed: int = 0


class _RowError(Exception):
    pass


def _item(record: dict[str, Any]) -> BulkItem:
    """A set item from one parsed row, or :class:`_RowError` saying what is wrong."""
    unknown = set(record) - {*COLUMNS, "reason"} - IGNORED
    if unknown:
        raise _RowError(f"unknown field {sorted(unknown)[0]!r}")
    missing = [c for c in COLUMNS if record.get(c) in (None, "")]
    if missing:
        raise _RowError(f"{missing[0]} is missing")
    quantity = record["quantity"]
    if isinstance(quantity, str):
        quantity = quantity.strip()
        if not quantity.isdigit():
            raise _RowError(f"quantity must be a whole number, got {quantity[:40]!r}")
        quantity = int(quantity)
    if type(quantity) is not int or not 0 <= quantity <= MAX_STOCK:
        raise _RowError(f"quantity must be a whole number from 0 to {MAX_STOCK}")
    product_id, warehouse_id = record["product_id"], record["warehouse_id"]
    reason = record.get("reason") or None
    # Checked here with the server's own rules, so that no row can make the server
    # refuse a whole batch (a 422 for the request) instead of answering for the row.
    if not isinstance(product_id, str) or not is_product_id(product_id):
        raise _RowError(f"product_id must be 1-128 of [A-Za-z0-9._:-], got {product_id!r:.60}")
    if not isinstance(warehouse_id, str) or not is_warehouse_id(warehouse_id):
        raise _RowError(f"warehouse_id must be 1-64 of [A-Za-z0-9._-], got {warehouse_id!r:.60}")
    if reason is not None and (
        not isinstance(reason, str) or len(reason) > 500 or "\x00" in reason
    ):
        raise _RowError("reason must be text of at most 500 characters")
    return BulkItem(product_id, warehouse_id, quantity=quantity, reason=reason)


def _csv_rows(stream: IO[str]) -> Iterator[tuple[int, BulkItem | _RowError]]:
    reader = csv.DictReader(stream, restkey="\x00extra")
    header = reader.fieldnames
    if header is None:
        raise TransferError("the file is empty")
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in {*COLUMNS, "reason"} | IGNORED]
    if missing or unknown:
        raise TransferError(
            "the CSV header must name product_id, warehouse_id, quantity and optionally "
            f"reason (got {','.join(header)[:200]})"
        )
    for record in reader:
        line = reader.line_num
        if "\x00extra" in record:
            yield line, _RowError("more fields than the header names")
            continue
        if None in record.values():
            yield line, _RowError("fewer fields than the header names")
            continue
        try:
            yield line, _item(record)
        except _RowError as exc:
            yield line, exc


def _jsonl_rows(stream: IO[str]) -> Iterator[tuple[int, BulkItem | _RowError]]:
    for line, text in enumerate(stream, 1):
        if not text.strip():
            continue
        try:
            record = msgspec.json.decode(text)
        except msgspec.DecodeError:
            yield line, _RowError("not a JSON object")
            continue
        if not isinstance(record, dict):
            yield line, _RowError("not a JSON object")
            continue
        try:
            yield line, _item(record)
        except _RowError as exc:
            yield line, exc


def _progress(stderr: IO[str]) -> Progress:
    from rich.console import Console

    console = Console(file=stderr)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}% {task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # a bar only on a terminal; logs stay clean
    )


def _fmt(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"


@dataclass
class _Batch:
    """Rows read since the last send, in file order, and the send's future."""

    rows: list[tuple[int, BulkItem | _RowError]]
    keys: frozenset[tuple[str, str]]
    position: int  # bytes of the file read when the batch was sent
    results: Future[list[BulkResult]] | None = None


def import_file(
    client: Client,
    path: Path,
    fmt: str | None = None,
    stderr: IO[str] = sys.stderr,
    *,
    concurrency: int = CONCURRENCY,
) -> ImportSummary:
    """Import ``path`` with up to ``concurrency`` batches in flight; per-row errors go to
    ``stderr`` as ``line N: ...`` in line order."""
    if concurrency < 1:
        raise TransferError("concurrency must be at least 1")
    summary = ImportSummary()
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {exc.strerror}") from None
    size = path.stat().st_size
    inflight: deque[_Batch] = deque()
    with (
        raw,
        io.TextIOWrapper(raw, encoding="utf-8", newline="") as text,
        _progress(stderr) as progress,
        ThreadPoolExecutor(concurrency, thread_name_prefix="import") as pool,
    ):
        task = progress.add_task(f"import {path.name}", total=size or 1, rows=0)
        rows = _jsonl_rows(text) if _fmt(path, fmt) == "jsonl" else _csv_rows(text)
        done_rows = 0

        def finish_oldest() -> None:
            nonlocal done_rows
            batch = inflight.popleft()
            results = iter(batch.results.result() if batch.results else [])
            for line, row in batch.rows:
                if isinstance(row, _RowError):
                    message = str(row)
                else:
                    error = next(results).error
                    if error is None:
                        summary.imported += 1
                        continue
                    message = f"{error.code}: {error.message}"
                summary.failed += 1
                progress.console.print(f"line {line}: {message}", markup=False, highlight=False)
            done_rows += len(batch.rows)
            progress.update(task, completed=batch.position, rows=done_rows)

        def send(pending: list[tuple[int, BulkItem | _RowError]]) -> None:
            items = [row for _, row in pending if isinstance(row, BulkItem)]
            keys = frozenset((i.product_id, i.warehouse_id) for i in items)
            # Wait for the oldest batches while the pool is full or one of them names a
            # row of this batch (file order per row).
            while inflight and (
                len(inflight) >= concurrency or any(keys & b.keys for b in inflight)
            ):
                finish_oldest()
            batch = _Batch(pending, keys, raw.tell())
            if items:
                batch.results = pool.submit(_send, client, items)
            inflight.append(batch)

        try:
            pending: list[tuple[int, BulkItem | _RowError]] = []
            for line, row in rows:
                summary.rows += 1
                pending.append((line, row))
                if len(pending) == BATCH:
                    send(pending)
                    pending = []
            if pending:
                send(pending)
            while inflight:
                finish_oldest()
        except UnicodeDecodeError:
            raise TransferError(f"{path} is not UTF-8 text") from None
        finally:
            for batch in inflight:  # stopping on an error: no new requests
                if batch.results is not None:
                    batch.results.cancel()
        progress.update(task, completed=size or 1, rows=summary.rows)
    return summary


def _send(client: Client, items: list[BulkItem]) -> list[BulkResult]:
    try:
        return client.bulk(items)
    except httpx.TransportError as exc:
        raise TransferError(f"cannot reach the server at {client.base_url}: {exc}") from None
    except ApiError as exc:
        raise TransferError(f"the server refused the import: {exc}") from None


def _export_values(product_id: str, lv: Level) -> tuple[Any, ...]:
    stamp = lv.updated_at.isoformat().replace("+00:00", "Z") if lv.updated_at else None
    return (product_id, lv.warehouse_id, lv.quantity, lv.reserved, lv.available, lv.version,
            stamp)  # fmt: skip


def export_rows(
    client: Client, out: IO[str], fmt: str = "csv", stderr: IO[str] = sys.stderr
) -> int:
    """Write every stock row to ``out``; returns how many."""
    count = 0
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(EXPORT_COLUMNS)
    try:
        with _progress(stderr) as progress:
            task = progress.add_task("export", total=None, rows=0)
            for product in client.iter_products(limit=1000):
                if product.stock is None:
                    continue
                for lv in product.stock.levels:
                    values = _export_values(product.product_id, lv)
                    if writer is not None:
                        writer.writerow(values)
                    else:
                        record = dict(zip(EXPORT_COLUMNS, values, strict=True))
                        out.write(msgspec.json.encode(record).decode() + "\n")
                    count += 1
                progress.update(task, rows=count)
    except httpx.TransportError as exc:
        raise TransferError(f"cannot reach the server at {client.base_url}: {exc}") from None
    except ApiError as exc:
        raise TransferError(f"the server refused the export: {exc}") from None
    return count
