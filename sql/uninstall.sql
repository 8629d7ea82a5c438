-- citapulse: uninstall (idempotent). Drops every trigger citapulse installed, the
-- publication and slot of WAL mode, then the schema with its log. User tables and their rows are untouched.
BEGIN;
SET LOCAL client_min_messages = warning;
DO $$
DECLARE
    r record;
BEGIN
    IF to_regnamespace('citapulse') IS NULL THEN
        RETURN;
    END IF;
    FOR r IN SELECT t.tgrelid::regclass AS tbl, t.tgname
               FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
              WHERE p.pronamespace = 'citapulse'::regnamespace AND NOT t.tgisinternal
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.tbl);
    END LOOP;
    -- WAL mode (version 6): give tables back their replica identity, drop the
    -- publication and the slot (unless a daemon is streaming from it right now).
    IF to_regclass('citapulse.watches') IS NOT NULL THEN
        FOR r IN SELECT w.tbl, w.saved_identity FROM citapulse.watches w
                  WHERE w.saved_identity IS NOT NULL AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = w.tbl)
        LOOP
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY %s', r.tbl,
                           CASE r.saved_identity WHEN 'd' THEN 'DEFAULT' WHEN 'n' THEN 'NOTHING' ELSE 'FULL' END);
        END LOOP;
        PERFORM pg_drop_replication_slot(p.slot)
           FROM citapulse.wal_position p JOIN pg_replication_slots s ON s.slot_name = p.slot AND NOT s.active;
    END IF;
END
$$;
DROP PUBLICATION IF EXISTS citapulse;
DROP SCHEMA IF EXISTS citapulse CASCADE;
COMMIT;
