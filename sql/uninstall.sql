-- citapulse: uninstall (idempotent). Drops every trigger citapulse installed, then the
-- schema with its log. User tables and their rows are untouched.
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
END
$$;
DROP SCHEMA IF EXISTS citapulse CASCADE;
COMMIT;
