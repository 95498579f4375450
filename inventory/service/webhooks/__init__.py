"""Webhooks: signed HTTP deliveries of ledger events to registered endpoints.

``events`` turns ledger rows into events (a table of event type -> producer),
``store`` holds the SQL, ``targets`` the SSRF guard, ``signing`` the signature,
``delivery`` the per-endpoint deliverers and ``api`` the registration routes.
"""
