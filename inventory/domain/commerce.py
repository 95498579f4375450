"""Flash-sale rules: safety stock, purchase limits, the waitlist's claim on stock, kits.

Pure (no I/O), like :mod:`inventory.domain.model`. These are the derived numbers the SPEC's
"Products" and "Flash-sale protections" sections define, computed here once and used by
the reservation engine's batch state (:class:`~inventory.service.engine.BatchState`), the
stock bodies and the waitlist offerer:

- ``reservable = max(0, available in active warehouses - safety_stock)``;
- what a new reservation may take is ``reservable`` minus the quantities waiting in the
  product's queue (:meth:`ProductRules.claimable`); an entry's offer may take what lies
  beyond the entries waiting before it (the head: all of ``reservable``);
- a kit's ``reservable`` is the minimum over its components of
  ``floor(component reservable / quantity per kit)``;
- a customer's held units of a limited product plus a request's units may not exceed
  ``max_per_customer``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .model import InventoryError, RequestedLine, StockLevel, Warehouse

__all__ = [
    "AlreadyWaiting",
    "CustomerRequired",
    "IsKit",
    "KitComponent",
    "ProductRules",
    "PurchaseLimitExceeded",
    "active_available",
    "expand_kits",
    "kit_reservable",
    "reservable",
]


class CustomerRequired(InventoryError):
    """A line for a product with ``max_per_customer`` came without ``customer_id`` (422)."""

    code = "customer_required"
    status = 422


class PurchaseLimitExceeded(InventoryError):
    """The customer's held units plus the request exceed ``max_per_customer`` (409);
    ``details`` is ``{product_id, limit, held}``."""

    code = "purchase_limit_exceeded"
    status = 409


class AlreadyWaiting(InventoryError):
    """The customer already has a waiting entry for the product (409)."""

    code = "already_waiting"
    status = 409


class IsKit(InventoryError):
    """A stock row was asked for a kit, or a kit was named as a component (a kit's stock
    is derived from its components and never has rows of its own)."""

    code = "is_kit"
    status = 409


@dataclass(frozen=True, slots=True)
class KitComponent:
    product_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class ProductRules:
    """What a reservation batch needs to know about one product beyond its rows."""

    safety_stock: int = 0
    max_per_customer: int | None = None
    components: tuple[KitComponent, ...] | None = None
    waiting: int = 0  # units in the product's waiting entries

    def claimable(self, available: int, *, ahead: int | None = None) -> int:
        """Units a new reservation may take when the active warehouses have ``available``:
        what lies beyond the waiting units; for a waitlist entry's offer (``ahead``: the
        units of the entries waiting before it), what lies beyond those."""
        free = reservable(available, self.safety_stock)
        return max(0, free - (self.waiting if ahead is None else ahead))


def reservable(available: int, safety_stock: int) -> int:
    """``max(0, available in active warehouses - safety_stock)``."""
    return max(0, available - safety_stock)


def active_available(levels: Iterable[StockLevel], warehouses: Mapping[str, Warehouse]) -> int:
    """Sum of ``available`` over the rows in active warehouses."""
    return sum(lv.available for lv in levels if warehouses[lv.warehouse_id].can_allocate)


class _Part(Protocol):
    @property
    def product_id(self) -> str: ...
    @property
    def quantity(self) -> int: ...


def kit_reservable(components: Sequence[_Part], reservables: Mapping[str, int]) -> int:
    """Whole kits the components' ``reservable`` can make (a component without rows: 0)."""
    return min(reservables.get(c.product_id, 0) // c.quantity for c in components)


def expand_kits(
    lines: Sequence[RequestedLine], kits: Mapping[str, Sequence[KitComponent]]
) -> tuple[RequestedLine, ...]:
    """Replace each line for ``n`` of a kit by lines for ``n * quantity`` of each
    component (in component order, pinned to the line's warehouse if it was), carrying
    ``kit_id``; other lines stay as they are, in request order."""
    out: list[RequestedLine] = []
    for line in lines:
        components = kits.get(line.product_id)
        if components is None:
            out.append(line)
            continue
        out += [
            RequestedLine(c.product_id, line.quantity * c.quantity, line.warehouse_id,
                          line.product_id)
            for c in components
        ]  # fmt: skip
    return tuple(out)
