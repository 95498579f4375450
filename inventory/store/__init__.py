"""The store layer: PostgreSQL through asyncpg.

Implements the storage the service layer needs, returns domain objects and raises domain
errors (asyncpg's exceptions never leave it). Imports the domain (and ``realtime``'s
ports, which :mod:`.feed` implements), never the service, HTTP or ops layers.
"""
