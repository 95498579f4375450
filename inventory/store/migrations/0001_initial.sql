-- Initial schema: warehouses, stock levels, reservations, movement ledger (also the
-- real-time outbox), idempotency records and the relay cursor.

CREATE TABLE warehouses (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    location    text,
    status      text NOT NULL CHECK (status IN ('active', 'inactive', 'maintenance')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stock_levels (
    product_id    text NOT NULL,
    warehouse_id  text NOT NULL REFERENCES warehouses (id),
    quantity      bigint NOT NULL,
    reserved      bigint NOT NULL DEFAULT 0,
    version       bigint NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_id, warehouse_id),
    CONSTRAINT stock_reserved_bounds CHECK (reserved >= 0 AND reserved <= quantity),
    CONSTRAINT stock_version_positive CHECK (version >= 1)
);

CREATE TABLE reservations (
    id          uuid PRIMARY KEY,
    status      text NOT NULL CHECK (status IN ('active', 'committed', 'released', 'expired')),
    reference   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- The expiry sweeper scans only active reservations by deadline.
CREATE INDEX reservations_active_expiry ON reservations (expires_at) WHERE status = 'active';

CREATE TABLE reservation_lines (
    reservation_id  uuid NOT NULL REFERENCES reservations (id),
    line_no         integer NOT NULL,
    product_id      text NOT NULL,
    warehouse_id    text NOT NULL,
    quantity        bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, line_no)
);
CREATE INDEX reservation_lines_row ON reservation_lines (product_id, warehouse_id);

-- Append-only ledger. `xid` is the writing transaction's id: the relay reads rows in
-- (xid, id) order below the oldest running transaction, so it never skips a row that
-- commits out of id order.
CREATE TABLE movements (
    id              bigserial PRIMARY KEY,
    xid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    product_id      text NOT NULL,
    warehouse_id    text NOT NULL,
    kind            text NOT NULL
                    CHECK (kind IN ('adjusted', 'reserved', 'released', 'committed', 'expired')),
    quantity_delta  bigint NOT NULL,
    reserved_delta  bigint NOT NULL,
    quantity        bigint NOT NULL,
    reserved        bigint NOT NULL,
    version         bigint NOT NULL,
    reservation_id  uuid,
    reason          text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX movements_product ON movements (product_id, id);
CREATE INDEX movements_relay ON movements (xid, id);

CREATE TABLE idempotency_keys (
    scope         text NOT NULL,
    key           text NOT NULL,
    body_hash     bytea NOT NULL,
    status_code   integer,
    response      bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- One row per named relay: the (xid, id) position of the last published movement.
CREATE TABLE relay_cursor (
    name     text PRIMARY KEY,
    last_xid xid8 NOT NULL,
    last_id  bigint NOT NULL
);
