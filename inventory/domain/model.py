"""The inventory domain: stock levels, warehouses, reservations, allocation and errors.

Pure: no I/O, no clock, no randomness. Callers pass the current time and ids in; every
operation returns new immutable values (a changed :class:`StockLevel` plus the
:class:`Movement` that records the change) or raises an :class:`InventoryError` whose
``code`` is the API error code. The database enforces the same invariants with CHECK
constraints; the rules live here so they can be tested without a database.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar
from uuid import UUID

__all__ = [
    "IDEMPOTENCY_KEY_RE",
    "IDEMPOTENCY_KEY_RULE",
    "MAX_LINES",
    "MAX_ON_HAND",
    "MAX_QUANTITY",
    "MAX_TTL_SECONDS",
    "MIN_TTL_SECONDS",
    "PRODUCT_ID_RE",
    "PRODUCT_ID_RULE",
    "WAREHOUSE_ID_RE",
    "WAREHOUSE_ID_RULE",
    "Allocation",
    "Contention",
    "IdempotencyKeyReused",
    "InsufficientStock",
    "InvalidState",
    "InventoryError",
    "Movement",
    "MovementKind",
    "NotFound",
    "RequestedLine",
    "Reservation",
    "ReservationLine",
    "ReservationStatus",
    "StockLevel",
    "Unavailable",
    "ValidationFailed",
    "VersionConflict",
    "Warehouse",
    "WarehouseStatus",
    "WarehouseUnavailable",
    "allocate",
    "error_classes",
    "is_product_id",
    "is_warehouse_id",
    "row_deltas",
    "schema_pattern",
]

# The id rules, here only: the domain checks, the HTTP schemas, OpenAPI and the WebSocket
# protocol (realtime.protocol imports them) all use these. Webhook ids follow the
# warehouse rule.
WAREHOUSE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
WAREHOUSE_ID_RULE = "1-64 characters of [A-Za-z0-9._-]"
PRODUCT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PRODUCT_ID_RULE = "1-128 characters of [A-Za-z0-9._:-]"
IDEMPOTENCY_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")
IDEMPOTENCY_KEY_RULE = "1-255 printable ASCII characters"
MAX_QUANTITY = 1_000_000
MAX_ON_HAND = 1_000_000_000  # per stock row; keeps every sum far inside bigint
MAX_LINES = 100
MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 24 * 3600


def schema_pattern(rule: re.Pattern[str]) -> str:
    """``rule`` as a whole-string pattern for JSON Schema and msgspec, which search with
    it: ``^...$`` alone would let a final newline through (Python's ``$`` matches before
    one); ``(?!\\n)`` refuses it and means the same to a JavaScript validator."""
    return f"^{rule.pattern}$(?!\\n)"


def is_warehouse_id(value: str) -> bool:
    """True when ``value`` is a well-formed warehouse (or webhook) id."""
    return WAREHOUSE_ID_RE.fullmatch(value) is not None


def is_product_id(value: str) -> bool:
    """True when ``value`` is a well-formed product id."""
    return PRODUCT_ID_RE.fullmatch(value) is not None


# --- errors ---------------------------------------------------------------------------


_ERRORS: dict[str, type[InventoryError]] = {}


class InventoryError(Exception):
    """Base of every rule violation a caller can handle: ``code`` is the API error code,
    ``status`` its HTTP status, both declared in the body of each subclass, nowhere else.

    Defining a subclass registers it under its code (:func:`error_classes`). One that does
    not declare both, declares a status outside 400-599 or takes another class's code
    fails when its module is imported, so no error can leave as a 500 for want of a
    status and no code answers with two statuses. The base itself is never raised.
    """

    code: ClassVar[str]
    status: ClassVar[int]

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        code, status = vars(cls).get("code"), vars(cls).get("status")
        if not isinstance(code, str) or not isinstance(status, int) or not 400 <= status <= 599:
            raise TypeError(f"{cls.__qualname__} must declare its code and a status 400-599")
        known = _ERRORS.get(code)
        where = (cls.__module__, cls.__qualname__)
        if known is not None and (known.__module__, known.__qualname__) != where:  # not a reload
            raise TypeError(f"{cls.__qualname__}: the code {code!r} is {known.__qualname__}'s")
        _ERRORS[code] = cls


def error_classes() -> Mapping[str, type[InventoryError]]:
    """Every error class defined so far, by code (read-only). A class is defined when its
    module is imported: a caller that needs all of them imports every module first (the
    tests do); documentation refers to the classes themselves, which imports them."""
    return MappingProxyType(_ERRORS)


class ValidationFailed(InventoryError):
    """The request breaks the schema or an id rule (checked before anything is read)."""

    code = "validation_error"
    status = 422


class NotFound(InventoryError):
    """A well-formed id names nothing."""

    code = "not_found"
    status = 404


class InsufficientStock(InventoryError):
    """Not enough available stock for a removal, a cycle count or a reservation."""

    code = "insufficient_stock"
    status = 409


class VersionConflict(InventoryError):
    """The caller's ``expected_version`` is stale; ``details`` has ``current_version``."""

    code = "version_conflict"
    status = 409


class WarehouseUnavailable(InventoryError):
    """A reservation line is pinned to a warehouse that is not active."""

    code = "warehouse_unavailable"
    status = 409


class InvalidState(InventoryError):
    """The reservation's state does not allow the transition; ``details`` has ``status``."""

    code = "invalid_state"
    status = 409


class IdempotencyKeyReused(InventoryError):
    """An ``Idempotency-Key`` was sent again with a different body."""

    code = "idempotency_key_reused"
    status = 422


class Unavailable(InventoryError):
    """PostgreSQL (or, for stream tickets and the lock strategy, Redis) cannot be reached
    right now."""

    code = "unavailable"
    status = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Contention(InventoryError):
    """Retries, the deadline or the lock wait ran out; the client should retry later."""

    code = "contention"
    status = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- warehouses -----------------------------------------------------------------------


class WarehouseStatus(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True, slots=True)
class Warehouse:
    id: str
    name: str
    location: str | None
    status: WarehouseStatus

    @property
    def can_allocate(self) -> bool:
        """Only active warehouses take new reservations."""
        return self.status is WarehouseStatus.ACTIVE


# --- stock levels ---------------------------------------------------------------------


class MovementKind(StrEnum):
    ADJUSTED = "adjusted"
    RESERVED = "reserved"
    RELEASED = "released"
    COMMITTED = "committed"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Movement:
    """One ledger record: what changed on one stock row and the row's state after it."""

    product_id: str
    warehouse_id: str
    kind: MovementKind
    quantity_delta: int
    reserved_delta: int
    quantity: int
    reserved: int
    version: int
    reservation_id: UUID | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class StockLevel:
    """On-hand and reserved stock of one product in one warehouse.

    ``version`` is 0 for a row that does not exist yet, 1 after its first change and grows
    by exactly one per persisted change. Invariant: ``0 <= reserved <= quantity``.
    """

    product_id: str
    warehouse_id: str
    quantity: int = 0
    reserved: int = 0
    version: int = 0
    updated_at: datetime | None = None

    @property
    def available(self) -> int:
        return self.quantity - self.reserved

    @property
    def exists(self) -> bool:
        return self.version > 0

    def _insufficient(self, requested: int) -> InsufficientStock:
        return InsufficientStock(
            f"only {self.available} of {self.product_id} available in {self.warehouse_id}",
            {
                "product_id": self.product_id,
                "warehouse_id": self.warehouse_id,
                "requested": requested,
                "available": self.available,
            },
        )

    def check_version(self, expected: int | None) -> None:
        """Raise :class:`VersionConflict` unless ``expected`` is None or current."""
        if expected is not None and expected != self.version:
            current = self.version if self.exists else None
            raise VersionConflict(
                f"expected version {expected}, current is {current}",
                {"current_version": current},
            )

    def _change(
        self,
        kind: MovementKind,
        quantity_delta: int,
        reserved_delta: int,
        reservation_id: UUID | None = None,
        reason: str | None = None,
    ) -> tuple[StockLevel, Movement]:
        new = replace(
            self,
            quantity=self.quantity + quantity_delta,
            reserved=self.reserved + reserved_delta,
            version=self.version + 1,
        )
        if not 0 <= new.reserved <= new.quantity:  # pragma: no cover - guarded by callers
            raise AssertionError(f"stock invariant broken: {new}")
        movement = Movement(
            self.product_id,
            self.warehouse_id,
            kind,
            quantity_delta,
            reserved_delta,
            new.quantity,
            new.reserved,
            new.version,
            reservation_id,
            reason,
        )
        return new, movement

    def adjust(self, delta: int, reason: str | None = None) -> tuple[StockLevel, Movement]:
        """Receive (+) or remove (-) on-hand stock; removal is bounded by ``available``."""
        if delta == 0:
            raise ValidationFailed("delta must not be 0", {"field": "delta"})
        if delta < 0 and -delta > self.available:
            raise self._insufficient(-delta)
        if self.quantity + delta > MAX_ON_HAND:
            raise ValidationFailed(
                f"on-hand would be {self.quantity + delta}, above the bound of {MAX_ON_HAND}",
                {"field": "delta", "quantity": self.quantity, "max_on_hand": MAX_ON_HAND},
            )
        return self._change(MovementKind.ADJUSTED, delta, 0, reason=reason)

    def set_quantity(
        self, quantity: int, reason: str | None = None
    ) -> tuple[StockLevel, Movement] | None:
        """Cycle count: set on-hand. None when nothing changes (no version bump, no ledger)."""
        if quantity < self.reserved:
            raise InsufficientStock(
                f"{quantity} on hand is below the {self.reserved} reserved",
                {
                    "product_id": self.product_id,
                    "warehouse_id": self.warehouse_id,
                    "requested": quantity,
                    "available": self.available,
                },
            )
        if not 0 <= quantity <= MAX_ON_HAND:
            raise ValidationFailed(
                f"quantity must be from 0 to {MAX_ON_HAND}", {"field": "quantity"}
            )
        if quantity == self.quantity and self.exists:
            return None
        return self._change(MovementKind.ADJUSTED, quantity - self.quantity, 0, reason=reason)

    def reserve(self, n: int, reservation_id: UUID) -> tuple[StockLevel, Movement]:
        if n > self.available:
            raise self._insufficient(n)
        return self._change(MovementKind.RESERVED, 0, n, reservation_id)

    def unreserve(
        self, n: int, reservation_id: UUID, kind: MovementKind
    ) -> tuple[StockLevel, Movement]:
        """Return reserved stock (``released`` / ``expired``) or ship it (``committed``)."""
        if n > self.reserved:
            raise AssertionError(f"{self} cannot give back {n} reserved")
        quantity_delta = -n if kind is MovementKind.COMMITTED else 0
        return self._change(kind, quantity_delta, -n, reservation_id)


# --- reservations ---------------------------------------------------------------------


class ReservationStatus(StrEnum):
    ACTIVE = "active"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


_FINISH_KIND = {
    ReservationStatus.COMMITTED: MovementKind.COMMITTED,
    ReservationStatus.RELEASED: MovementKind.RELEASED,
    ReservationStatus.EXPIRED: MovementKind.EXPIRED,
}


@dataclass(frozen=True, slots=True)
class ReservationLine:
    product_id: str
    warehouse_id: str
    quantity: int
    kit_id: str | None = None  # the kit this line was expanded from


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on stock. Transitions: active -> committed | released | expired, nothing else.

    An active reservation whose ``expires_at`` has passed *reads* as expired at once
    (:meth:`status_at`), before the sweeper has returned its stock.
    """

    id: UUID
    status: ReservationStatus
    lines: tuple[ReservationLine, ...]
    reference: str | None
    created_at: datetime
    expires_at: datetime

    def status_at(self, now: datetime) -> ReservationStatus:
        if self.status is ReservationStatus.ACTIVE and now >= self.expires_at:
            return ReservationStatus.EXPIRED
        return self.status

    def finish(self, target: ReservationStatus, now: datetime) -> Reservation | None:
        """Move an active reservation to ``target`` (committed, released or expired).

        Returns the new reservation, or None when it already is in ``target`` (a repeated
        commit or release is answered with the same body and changes nothing). Commit and
        release of a reservation past its deadline fail as ``expired``; expiry of one not
        yet due fails as ``active``.
        """
        if self.status is target:
            return None
        if self.status is not ReservationStatus.ACTIVE:
            raise self._invalid(self.status, target)
        due = now >= self.expires_at
        if target is ReservationStatus.EXPIRED and not due:
            raise self._invalid(ReservationStatus.ACTIVE, target)
        if target is not ReservationStatus.EXPIRED and due:
            raise self._invalid(ReservationStatus.EXPIRED, target)
        return replace(self, status=target)

    @staticmethod
    def _invalid(current: ReservationStatus, target: ReservationStatus) -> InvalidState:
        return InvalidState(
            f"reservation is {current.value}, cannot become {target.value}",
            {"status": current.value},
        )

    def extend(self, ttl_seconds: int, now: datetime) -> Reservation:
        """Set the remaining lifetime to ``ttl_seconds`` from now (which may shorten it)."""
        current = self.status_at(now)
        if current is not ReservationStatus.ACTIVE:
            raise InvalidState(
                f"reservation is {current.value}, cannot be extended", {"status": current.value}
            )
        return replace(self, expires_at=now + timedelta(seconds=ttl_seconds))

    def movement_kind(self) -> MovementKind:
        """The ledger kind recorded when this (finished) reservation returned its stock."""
        return _FINISH_KIND[self.status]


def row_deltas(lines: Iterable[ReservationLine]) -> dict[tuple[str, str], int]:
    """Sum line quantities per stock row, sorted by (product, warehouse).

    Several lines on one row update it once (one version bump, one ledger row); the sorted
    order is the order rows are locked in, so multi-row writes never deadlock.
    """
    totals: dict[tuple[str, str], int] = {}
    for line in lines:
        key = (line.product_id, line.warehouse_id)
        totals[key] = totals.get(key, 0) + line.quantity
    return dict(sorted(totals.items()))


# --- allocation -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestedLine:
    product_id: str
    quantity: int
    warehouse_id: str | None = None
    kit_id: str | None = None  # set on the component lines a kit line expands to


@dataclass(frozen=True, slots=True)
class Allocation:
    """The outcome of :func:`allocate`: lines in request order and the rows they touch."""

    lines: tuple[ReservationLine, ...]
    rows: dict[tuple[str, str], StockLevel] = field(default_factory=dict)

    def deltas(self) -> dict[tuple[str, str], int]:
        return row_deltas(self.lines)


def allocate(
    requested: Sequence[RequestedLine],
    levels: Iterable[StockLevel],
    warehouses: Mapping[str, Warehouse],
) -> Allocation:
    """Decide which stock rows serve each requested line. All lines or none.

    Rules (the spec's "Decisions on the edge cases"):

    - Lines pinned to a warehouse are applied first, then the others in request order,
      each from what is left (a running balance per row).
    - An unpinned line goes to one active warehouse that can hold it whole, the one with
      the most available (ties: smaller warehouse id); otherwise it is split over active
      warehouses in that same order.
    - A pinned line on an inactive warehouse raises :class:`WarehouseUnavailable`; a pinned
      pair with no stock row counts as available 0.
    - A shortage raises :class:`InsufficientStock` listing every short product once, with
      ``requested`` summed over its lines and ``available`` over active warehouses.

    ``levels`` must hold every existing row of the requested products; ``warehouses`` every
    warehouse those rows or pinned lines name. Unknown products/warehouses are the caller's
    404s and are checked before this runs.
    """
    balance: dict[tuple[str, str], int] = {}
    rows: dict[tuple[str, str], StockLevel] = {}
    by_product: dict[str, list[StockLevel]] = {}
    for level in levels:
        key = (level.product_id, level.warehouse_id)
        rows[key] = level
        balance[key] = level.available
        by_product.setdefault(level.product_id, []).append(level)

    for line in requested:
        if line.warehouse_id is not None:
            wh = warehouses[line.warehouse_id]
            if not wh.can_allocate:
                raise WarehouseUnavailable(
                    f"warehouse {wh.id} is {wh.status.value}",
                    {"warehouse_id": wh.id, "status": wh.status.value},
                )

    order = [i for i, x in enumerate(requested) if x.warehouse_id is not None]
    order += [i for i, x in enumerate(requested) if x.warehouse_id is None]
    planned: dict[int, list[ReservationLine]] = {}
    short: set[str] = set()

    for i in order:
        line = requested[i]
        if line.warehouse_id is not None:
            key = (line.product_id, line.warehouse_id)
            if balance.get(key, 0) < line.quantity:
                short.add(line.product_id)
                continue
            balance[key] -= line.quantity
            planned[i] = [
                ReservationLine(line.product_id, line.warehouse_id, line.quantity, line.kit_id)
            ]
            continue
        candidates = sorted(
            (
                lv
                for lv in by_product.get(line.product_id, ())
                if warehouses[lv.warehouse_id].can_allocate
                and balance[(lv.product_id, lv.warehouse_id)] > 0
            ),
            key=lambda lv: (-balance[(lv.product_id, lv.warehouse_id)], lv.warehouse_id),
        )
        if sum(balance[(c.product_id, c.warehouse_id)] for c in candidates) < line.quantity:
            short.add(line.product_id)
            continue
        # Most available first: the first candidate holds the line whole when any can.
        parts: list[ReservationLine] = []
        remaining = line.quantity
        for c in candidates:
            key = (c.product_id, c.warehouse_id)
            take = min(remaining, balance[key])
            balance[key] -= take
            parts.append(ReservationLine(c.product_id, c.warehouse_id, take, line.kit_id))
            remaining -= take
            if remaining == 0:
                break
        planned[i] = parts

    if short:
        details = []
        for product_id in dict.fromkeys(x.product_id for x in requested):
            if product_id not in short:
                continue
            details.append(
                {
                    "product_id": product_id,
                    "requested": sum(x.quantity for x in requested if x.product_id == product_id),
                    "available": sum(
                        lv.available
                        for lv in by_product.get(product_id, ())
                        if warehouses[lv.warehouse_id].can_allocate
                    ),
                }
            )
        raise InsufficientStock("not enough stock for every line", details)

    lines = tuple(p for i in range(len(requested)) for p in planned[i])
    touched = {(x.product_id, x.warehouse_id) for x in lines}
    return Allocation(lines, {k: v for k, v in rows.items() if k in touched})
