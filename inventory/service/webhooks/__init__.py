"""Webhooks: signed HTTP deliveries of ledger events to registered endpoints.

``events`` turns ledger rows into events (a table of event type -> producer),
``targets`` the SSRF guard, ``signing`` the signature and ``delivery`` the per-endpoint
deliverers. The SQL is :mod:`inventory.store.webhooks`, the registration routes
:mod:`inventory.http.webhooks`.
"""
