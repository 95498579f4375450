-- Commit order of ledger writers, for the outbox relay (see inventory/store_feed.py).
--
-- Every transaction that inserts ledger rows takes one ticket at commit time: a deferred
-- constraint trigger (fires at COMMIT, after the transaction's own statements) takes a
-- shared transaction-level advisory lock, then the next value of ledger_commit_seq, and
-- records (ticket, xid). The relay reads the fence under the same lock held exclusively
-- (ledger_commit_fence): every ticket at or below it belongs to a transaction that has
-- finished, so reading tickets in order up to the fence never skips a committed row and
-- waits only for ledger writers that are committing at that instant.

CREATE SEQUENCE ledger_commit_seq;

CREATE TABLE ledger_commits (
    ticket  bigint PRIMARY KEY,
    xid     xid8 NOT NULL
);

CREATE FUNCTION ledger_commit_ticket() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    me text := pg_current_xact_id()::text;
BEGIN
    -- Once per transaction: the trigger fires for every ledger row.
    IF current_setting('inventory.ledger_ticket', true) IS DISTINCT FROM me THEN
        PERFORM pg_advisory_xact_lock_shared(24303, 1);  -- 24303 = 0x5EEF
        INSERT INTO ledger_commits (ticket, xid)
        VALUES (nextval('ledger_commit_seq'), pg_current_xact_id());
        PERFORM set_config('inventory.ledger_ticket', me, true);
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER movements_commit_ticket
AFTER INSERT ON movements
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION ledger_commit_ticket();

-- The newest ticket every transaction at or below which has finished; `after` when no
-- ticket above `after` was taken (an idle relay's poll takes no lock). Call it in its own
-- (autocommit) statement: the exclusive lock lasts only for this statement, waiting for
-- ledger writers that are committing right now, never for any other transaction.
CREATE FUNCTION ledger_commit_fence(after bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('ledger_commit_seq'), 0) <= after THEN
        RETURN after;
    END IF;
    PERFORM pg_advisory_xact_lock(24303, 1);
    RETURN coalesce(pg_sequence_last_value('ledger_commit_seq'), 0);
END
$$;

-- Relay cursors now count commit tickets; positions of the old (xid) order are void, so
-- every relay starts again at the current tail.
DELETE FROM relay_cursor;
ALTER TABLE relay_cursor DROP COLUMN last_xid;
ALTER TABLE relay_cursor ADD COLUMN last_ticket bigint NOT NULL;
