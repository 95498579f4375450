-- Product settings (SPEC "Products: settings ..."), listing indexes and the customer of a
-- reservation. Products still come into being with their first stock row; this table
-- holds only the settings a PUT /v1/products/{id} gave. Ids compare in byte order
-- (COLLATE "C") so listings page the same way whatever the database's locale.

CREATE TABLE products (
    product_id           text COLLATE "C" PRIMARY KEY,
    name                 text,
    safety_stock         bigint NOT NULL DEFAULT 0 CHECK (safety_stock >= 0),
    low_stock_threshold  bigint CHECK (low_stock_threshold >= 0),
    max_per_customer     bigint CHECK (max_per_customer >= 1),
    -- [{"product_id", "quantity"}], 1-20 entries, or NULL for a product that is not a kit
    components           jsonb CHECK (components IS NULL OR jsonb_typeof(components) = 'array'),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Distinct product ids of stock rows in byte order (GET /v1/products pages over it).
CREATE INDEX stock_levels_product_bytes ON stock_levels ((product_id COLLATE "C"));

-- Another migration may add the same column (purchase limits need it too).
ALTER TABLE reservations ADD COLUMN IF NOT EXISTS customer_id text;

-- GET /v1/reservations pages oldest first by (created_at, id), filtered or not.
CREATE INDEX reservations_listing ON reservations (created_at, id);
CREATE INDEX reservations_by_reference ON reservations (reference, created_at, id)
    WHERE reference IS NOT NULL;
CREATE INDEX IF NOT EXISTS reservations_by_customer ON reservations (customer_id, created_at, id)
    WHERE customer_id IS NOT NULL;
