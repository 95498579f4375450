"""Per-connection outbound stock state with conflation: pure, no I/O.

A :class:`ConflationBuffer` sits between the hub (which offers every update for the
connection's products) and the connection's single writer task (which pops what to send).

Policy:

* Full-state messages make intermediate steps worthless to a client that is behind, so
  the buffer keeps only the newest pending state per ``(product, warehouse)`` key. A key
  keeps its place in the send order when its state is replaced (first queued, first sent),
  so one hot row cannot starve the others.
* Per key, versions handed out never go backwards: an offer not newer than what the
  client has (or already has pending) is dropped as stale.
* A product being subscribed is *held*: its updates wait (conflated) until the snapshot
  has been queued, then only those newer than the snapshot (or the client's ``since``)
  are released. So the snapshot always precedes the updates of its product.
* Memory is bounded by ``capacity`` entries whatever the client does. When a new key does
  not fit, the update is dropped and its product marked *overflowed*; once the buffer has
  drained, the owner calls :meth:`take_overflow` and re-reads those products from the
  source of truth (a resync), which brings the client current again. Nothing is lost,
  only deferred to a coarser catch-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

__all__ = ["ConflationBuffer", "Offer"]


class Offer(Enum):
    """What :meth:`ConflationBuffer.offer` did with an update."""

    QUEUED = "queued"  # new pending key
    CONFLATED = "conflated"  # replaced an unsent older state of the same key
    HELD = "held"  # product awaits its snapshot
    STALE = "stale"  # not newer than what the client has or will get
    OVERFLOW = "overflow"  # no room: the product will be resynced
    IGNORED = "ignored"  # product not subscribed


_Entry = tuple[int, str]  # (version, encoded message)


class ConflationBuffer:
    """Newest pending state per (product, warehouse) for one connection.

    Kept small because every idle connection has one: the send order is the insertion
    order of the pending dict (no separate queue), and per product only a dict of the
    versions handed out.
    """

    __slots__ = ("_capacity", "_held", "_held_count", "_overflow", "_pending", "_versions")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._versions: dict[str, dict[str, int]] = {}  # product -> warehouse -> handed out
        self._held: dict[str, dict[str, _Entry]] = {}  # products awaiting their snapshot
        self._held_count = 0
        self._pending: dict[tuple[str, str], _Entry] = {}
        self._overflow: set[str] = set()

    def __len__(self) -> int:
        """Entries stored (pending plus held), at most ``capacity``."""
        return len(self._pending) + self._held_count

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._versions

    @property
    def product_count(self) -> int:
        return len(self._versions)

    @property
    def products(self) -> list[str]:
        """Subscribed products, held or released."""
        return list(self._versions)

    def hold(self, product_id: str) -> None:
        """Start a subscription: updates are kept back until :meth:`release`."""
        if product_id not in self._versions:
            self._versions[product_id] = {}
            self._held[product_id] = {}

    def release(self, product_id: str, versions: Mapping[str, int]) -> None:
        """The snapshot went out; the client now has ``versions`` (warehouse -> version).

        Held updates newer than that become sendable, in the order they arrived.
        """
        held = self._held.pop(product_id, None)
        if held is None:
            return
        handed = self._versions[product_id]
        for warehouse_id, version in versions.items():
            if version > handed.get(warehouse_id, 0):
                handed[warehouse_id] = version
        self._held_count -= len(held)
        for warehouse_id, entry in held.items():
            if entry[0] > handed.get(warehouse_id, 0):
                self._pending[(product_id, warehouse_id)] = entry

    def forget(self, product_id: str) -> None:
        """End a subscription and drop everything pending for it."""
        if self._versions.pop(product_id, None) is None:
            return
        held = self._held.pop(product_id, None)
        if held:
            self._held_count -= len(held)
        self._overflow.discard(product_id)
        for key in [key for key in self._pending if key[0] == product_id]:
            del self._pending[key]

    def offer(self, product_id: str, warehouse_id: str, version: int, message: str) -> Offer:
        """Queue ``message`` (state ``version`` of the key) unless the client has it."""
        handed = self._versions.get(product_id)
        if handed is None:
            return Offer.IGNORED
        held = self._held.get(product_id)
        if held is not None:
            current = held.get(warehouse_id)
            if current is not None:
                if version <= current[0]:
                    return Offer.STALE
                held[warehouse_id] = (version, message)
                return Offer.CONFLATED
            if not self._fits(product_id):
                return Offer.OVERFLOW
            held[warehouse_id] = (version, message)
            self._held_count += 1
            return Offer.HELD
        key = (product_id, warehouse_id)
        pending = self._pending.get(key)
        if pending is not None:
            if version <= pending[0]:
                return Offer.STALE
            self._pending[key] = (version, message)
            return Offer.CONFLATED
        if version <= handed.get(warehouse_id, 0):
            return Offer.STALE
        if not self._fits(product_id):
            return Offer.OVERFLOW
        self._pending[key] = (version, message)
        return Offer.QUEUED

    def _fits(self, product_id: str) -> bool:
        if len(self) < self._capacity:
            return True
        self._overflow.add(product_id)
        return False

    def pop(self) -> str | None:
        """The next message to send (oldest key first), or ``None`` when none is ready."""
        if not self._pending:
            return None
        # Replacing a value keeps a key's place, so insertion order is first-queued order.
        key = next(iter(self._pending))
        version, message = self._pending.pop(key)
        self._versions[key[0]][key[1]] = version
        return message

    def take_overflow(self) -> list[str]:
        """Products that dropped updates for lack of room; clears their overflow mark.

        Call when the buffer has drained and re-offer their current state (resync).
        """
        products = list(self._overflow)
        self._overflow.clear()
        return products
