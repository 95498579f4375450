"""Per-connection outbound stock state with conflation: pure, no I/O.

A :class:`ConflationBuffer` sits between the hub (which offers every update for the
connection's products) and the connection's writer: the hub's own call writing directly
when the socket takes data, or the session's writer task while it pushes back (see
:mod:`realtime.session`); one of them at a time pops what to send.

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
from types import MappingProxyType
from typing import Generic, TypeVar, cast

__all__ = ["ConflationBuffer", "Offer"]

M = TypeVar("M")  # the encoded message: opaque to the buffer

# Versions handed out for a product of which nothing was handed out yet: shared by every
# such subscription (and immutable), so a subscription costs no dict until it is used.
_NOTHING_HANDED: Mapping[str, int] = MappingProxyType({})


class Offer(Enum):
    """What :meth:`ConflationBuffer.offer` did with an update."""

    QUEUED = "queued"  # new pending key
    CONFLATED = "conflated"  # replaced an unsent older state of the same key
    HELD = "held"  # product awaits its snapshot
    STALE = "stale"  # not newer than what the client has or will get
    OVERFLOW = "overflow"  # no room: the product will be resynced
    IGNORED = "ignored"  # product not subscribed


class ConflationBuffer(Generic[M]):
    """Newest pending state per (product, warehouse) for one connection.

    Kept small because every idle connection has one: the send order is the insertion
    order of the pending dict (no separate queue), per product only a dict of the
    versions handed out (none until something is), and the overflow set exists only
    while something overflowed.
    """

    __slots__ = ("_capacity", "_held", "_held_count", "_overflow", "_pending", "_versions")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._versions: dict[str, Mapping[str, int]] = {}  # product -> warehouse -> handed
        self._held: dict[str, dict[str, tuple[int, M]]] = {}  # awaiting their snapshot
        self._held_count = 0
        self._pending: dict[tuple[str, str], tuple[int, M]] = {}
        self._overflow: set[str] | None = None

    def __len__(self) -> int:
        """Entries stored (pending plus held), at most ``capacity``."""
        return len(self._pending) + self._held_count

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._versions

    @property
    def sendable(self) -> bool:
        """Whether :meth:`pop` has something to hand out."""
        return bool(self._pending)

    @property
    def overflowed(self) -> bool:
        """Whether some product dropped updates since the last :meth:`take_overflow`."""
        return self._overflow is not None

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
            self._versions[product_id] = _NOTHING_HANDED
            self._held[product_id] = {}

    def release(self, product_id: str, versions: Mapping[str, int]) -> None:
        """The snapshot went out; the client now has ``versions`` (warehouse -> version).

        Held updates newer than that become sendable, in the order they arrived.
        """
        held = self._held.pop(product_id, None)
        if held is None:
            return
        handed = self._versions[product_id]
        newer = {w: v for w, v in versions.items() if v > handed.get(w, 0)}
        if newer:
            handed = self._handed(product_id)
            handed.update(newer)
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
        if self._overflow is not None:
            self._overflow.discard(product_id)
            if not self._overflow:
                self._overflow = None
        for key in [key for key in self._pending if key[0] == product_id]:
            del self._pending[key]

    def offer(self, product_id: str, warehouse_id: str, version: int, message: M) -> Offer:
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

    def hand_out(self, product_id: str, warehouse_id: str, version: int) -> bool | None:
        """For a writer sending an update at once, with nothing pending (the fast path):
        true when ``version`` is newer than what the client has (now recorded as handed
        out), false when stale; ``None`` when the product is held or not subscribed, so
        the update must go through :meth:`offer`."""
        handed = self._versions.get(product_id)
        if handed is None or product_id in self._held:
            return None
        if version <= handed.get(warehouse_id, 0):
            return False
        if handed is _NOTHING_HANDED:
            handed = self._versions[product_id] = {}
        handed[warehouse_id] = version  # type: ignore[index]
        return True

    def _fits(self, product_id: str) -> bool:
        if len(self) < self._capacity:
            return True
        if self._overflow is None:
            self._overflow = set()
        self._overflow.add(product_id)
        return False

    def pop(self) -> M | None:
        """The next message to send (oldest key first), or ``None`` when none is ready."""
        if not self._pending:
            return None
        # Replacing a value keeps a key's place, so insertion order is first-queued order.
        key = next(iter(self._pending))
        version, message = self._pending.pop(key)
        self._handed(key[0])[key[1]] = version
        return message

    def _handed(self, product_id: str) -> dict[str, int]:
        """The product's versions handed out, for writing (its own dict from now on)."""
        handed = self._versions[product_id]
        if handed is _NOTHING_HANDED:
            handed = self._versions[product_id] = {}
        return cast(dict[str, int], handed)  # every other value is a dict of its own

    def take_overflow(self) -> list[str]:
        """Products that dropped updates for lack of room; clears their overflow mark.

        Call when the buffer has drained and re-offer their current state (resync).
        """
        products = list(self._overflow or ())
        self._overflow = None
        return products
