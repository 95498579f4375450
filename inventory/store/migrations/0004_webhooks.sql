-- Webhooks: registrations with their ledger cursor, the per-webhook queue of events
-- waiting for delivery, and the log of delivery attempts.

CREATE TABLE webhooks (
    id          text PRIMARY KEY,
    url         text NOT NULL,
    events      text[] NOT NULL,
    secret      text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    -- (xid, id) of the last ledger row turned into events, as the relay's cursor.
    cursor_xid  xid8 NOT NULL,
    cursor_id   bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Events taken from the ledger and not yet acknowledged (or given up): a row leaves the
-- table on a 2xx or after the retry window. `products` orders delivery: an event waits
-- for every earlier queued event that shares a product with it.
CREATE TABLE webhook_events (
    webhook_id        text NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    seq               bigserial,
    event_id          uuid NOT NULL,
    type              text NOT NULL,
    products          text[] NOT NULL,
    body              bytea NOT NULL,
    created_at        timestamptz NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    first_attempt_at  timestamptz,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (webhook_id, seq),
    UNIQUE (webhook_id, event_id)
);

CREATE TABLE webhook_deliveries (
    id             bigserial PRIMARY KEY,
    webhook_id     text NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id       uuid NOT NULL,
    type           text NOT NULL,
    attempt        integer NOT NULL,
    status_code    integer,
    error          text,
    at             timestamptz NOT NULL DEFAULT now(),
    next_retry_at  timestamptz
);
CREATE INDEX webhook_deliveries_page ON webhook_deliveries (webhook_id, id DESC);
CREATE INDEX webhook_deliveries_at ON webhook_deliveries (at);
