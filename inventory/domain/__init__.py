"""The domain layer: the inventory's rules as pure code (no I/O, no asyncpg, Redis or HTTP).

``model`` holds stock levels, warehouses, the reservation state machine, allocation, the
id rules and the error classes; ``commerce`` the flash-sale rules. Imports nothing of ours
outside this package; every other layer (and ``realtime``) may import it.
"""
