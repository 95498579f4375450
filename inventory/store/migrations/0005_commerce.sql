-- Flash-sale commerce (SPEC "Products: settings, safety stock, low stock, kits" and
-- "Flash-sale protections"): the customer of a reservation, the kit a line came from,
-- the waitlist, and the state the low-stock alert detector keeps per product.

-- 0006 adds the same column; whichever runs first creates it.
ALTER TABLE reservations ADD COLUMN IF NOT EXISTS customer_id text;
-- The customer's held units are counted per (customer, product) inside the reservation
-- transaction: reservations of one customer, then their lines.
CREATE INDEX IF NOT EXISTS reservations_by_customer ON reservations (customer_id, created_at, id)
    WHERE customer_id IS NOT NULL;
-- A line expanded from a kit line names the kit.
ALTER TABLE reservation_lines ADD COLUMN kit_id text;

CREATE TABLE waitlist (
    id               uuid PRIMARY KEY,
    -- Queue order: served strictly by seq within a product.
    seq              bigserial NOT NULL UNIQUE,
    product_id       text NOT NULL,
    customer_id      text NOT NULL,
    quantity         bigint NOT NULL CHECK (quantity > 0),
    hold_seconds     integer NOT NULL CHECK (hold_seconds BETWEEN 1 AND 86400),
    warehouse_id     text,
    status           text NOT NULL CHECK (status IN ('waiting', 'offered', 'cancelled')),
    reservation_id   uuid REFERENCES reservations (id),
    -- Idempotency-Key of the creating request (scope = token digest) and its body hash.
    idem_scope       text,
    idem_key         text,
    body_hash        bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'offered') = (reservation_id IS NOT NULL))
);
-- The queue of a product, head first (only waiting entries are ever scanned).
CREATE INDEX waitlist_queue ON waitlist (product_id, seq) WHERE status = 'waiting';
-- One waiting entry per customer and product.
CREATE UNIQUE INDEX waitlist_one_waiting ON waitlist (product_id, customer_id)
    WHERE status = 'waiting';
CREATE UNIQUE INDEX waitlist_idempotency ON waitlist (idem_scope, idem_key)
    WHERE idem_key IS NOT NULL;
