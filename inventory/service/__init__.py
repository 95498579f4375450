"""The service layer: use cases, the reservation engine, expiry, the flash-sale features
and the webhook deliverers.

Imports the domain and the store, never HTTP or ops: it knows nothing of requests or
responses (answers to replay are rendered by the caller, see :mod:`.idempotency`).
"""
