"""Every Redis key and channel name of the product, built in one place.

Layout (``P`` is the encoded prefix, ``E`` the encoded product id)::

    P:lock:{E}      the product's lock (a string holding the holder's token)
    P:fence:{E}     the lock's fence counter (never expires)
    P:stock:{E}     the product's stock channel (PUBLISH, or SPUBLISH in a cluster)
    P:kit:{E}       a kit's published number and seq (a hash)
    P:relay:{P}:X   relay state ``X`` (shared by every relay of the prefix)

Encoding: ids are percent-encoded, every byte outside ``[A-Za-z0-9._-]`` written as
``%XX`` (``%`` itself included), so an encoded id holds no ``:``, ``{`` or ``}``. The
encoding is injective and the separators never occur inside a part, so two different
(kind, id) pairs can never give the same name, whatever characters an id holds. This is
what the older layout (``P:lock:<id>`` with the fence at ``<lock key>:fence``) lacked:
the fence of product ``p`` was the lock of product ``p:fence``. Ids made of the
usual characters (``sku-42``, ``A.b_c``) are written unchanged, so keys stay readable.

Hash tags: Redis Cluster hashes only the part between the first ``{`` and the next
``}``. A product's lock, fence and channel carry the same tag (its encoded id), so the
lock script that touches lock and fence runs in one slot, and a product's channel lives
on the shard that owns its lock. The relay's keys carry the prefix as their tag, so they
share one slot. Single-node Redis ignores tags.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

__all__ = ["RedisKeys", "encode_part"]

_SAFE = "._-"  # besides ASCII letters and digits, which quote() never encodes


def encode_part(text: str) -> str:
    """``text`` percent-encoded (UTF-8) so it holds only ``[A-Za-z0-9._%-]``."""
    return quote(text, safe=_SAFE)


class RedisKeys:
    """Key and channel names under one prefix (``INVENTORY_REDIS_PREFIX``)."""

    __slots__ = ("_channel_head", "_prefix", "prefix")

    def __init__(self, prefix: str) -> None:
        if not prefix:
            raise ValueError("the Redis prefix must not be empty")
        self.prefix = prefix
        self._prefix = encode_part(prefix)
        self._channel_head = f"{self._prefix}:stock:{{"

    def lock(self, product_id: str) -> str:
        """The product's lock key."""
        return f"{self._prefix}:lock:{{{encode_part(product_id)}}}"

    def fence(self, product_id: str) -> str:
        """The fence counter of the product's lock (same slot as :meth:`lock`)."""
        return f"{self._prefix}:fence:{{{encode_part(product_id)}}}"

    def lock_pair(self, product_id: str) -> tuple[str, str]:
        """``(lock key, fence key)`` as :func:`locks.acquire_many` takes them."""
        return self.lock(product_id), self.fence(product_id)

    def stock_channel(self, product_id: str) -> str:
        """The channel the relay publishes the product's stock changes on."""
        return f"{self._channel_head}{encode_part(product_id)}}}"

    @property
    def stock_pattern(self) -> str:
        """A glob (PSUBSCRIBE) matching every stock channel of the prefix."""
        return f"{self._prefix}:stock:*"

    def product_of_channel(self, channel: bytes) -> str | None:
        """The product id of a stock channel name, or ``None`` if it is not one.

        On the hub's per-message path: ids without escapes skip the decoding.
        """
        text = channel.decode()
        head = self._channel_head
        if not text.startswith(head) or not text.endswith("}"):
            return None
        encoded = text[len(head) : -1]
        return unquote(encoded) if "%" in encoded else encoded

    def kit(self, kit_id: str) -> str:
        """A hash of the kit's last published number, its ``seq`` (only goes up) and the
        database snapshot it was read in, in the kit's slot."""
        return f"{self._prefix}:kit:{{{encode_part(kit_id)}}}"

    def stream_ticket(self, digest: str) -> str:
        """A stream ticket, named by the SHA-256 hex digest of its value (never the value)."""
        return f"{self._prefix}:stream-ticket:{digest}"

    def relay(self, name: str) -> str:
        """A key of the relay's own state (all of them in one cluster slot)."""
        return f"{self._prefix}:relay:{{{self._prefix}}}:{encode_part(name)}"
