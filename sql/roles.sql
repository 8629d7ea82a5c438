-- citapulse: the daemon's roles (idempotent; run with psql -f sql/roles.sql after
-- sql/install.sql, and again after each upgrade, as the installing role: the owner of
-- schema citapulse and of the watched tables, with CREATEROLE; or as a superuser).
--
--   citapulse_daemon      NOLOGIN: what a daemon needs in trigger mode
--   citapulse_daemon_wal  NOLOGIN, member of citapulse_daemon: what WAL mode adds
--
-- Then give the daemon a login in one of them, e.g.
--   CREATE ROLE citapulse_app LOGIN PASSWORD '...' IN ROLE citapulse_daemon;
-- and, for WAL mode, IN ROLE citapulse_daemon_wal with the REPLICATION attribute, which
-- a role cannot pass on to its members: ALTER ROLE citapulse_app REPLICATION (on Amazon
-- RDS / Aurora: GRANT rds_replication TO citapulse_app).
--
-- The watched tables get SELECT (the statistics query reads them): run this again after
-- watching new tables. Tables that only [[resolvers]], [[enrich]], tenants.timezone_query
-- or a custom stats.query read need their own GRANT SELECT.
--
-- Nothing here is ownership, superuser or CREATE: the daemon cannot watch, switch the
-- capture mode, revoke users, or write the application's tables. Removing: sql/uninstall.sql
-- leaves the roles; then, in every database they have grants in,
--   DROP OWNED BY citapulse_daemon_wal, citapulse_daemon;
-- and once: DROP ROLE citapulse_daemon_wal, citapulse_daemon;

BEGIN;
SET LOCAL client_min_messages = warning;

DO $$
DECLARE
    r text;
BEGIN
    IF to_regprocedure('citapulse.version()') IS NULL THEN
        RAISE EXCEPTION 'citapulse is not installed in this database: run sql/install.sql first';
    END IF;
    FOREACH r IN ARRAY ARRAY['citapulse_daemon', 'citapulse_daemon_wal'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by another session (roles are cluster-wide)
            END;
        END IF;
    END LOOP;
    IF NOT pg_catalog.pg_has_role('citapulse_daemon_wal', 'citapulse_daemon', 'MEMBER') THEN
        GRANT citapulse_daemon TO citapulse_daemon_wal;
    END IF;
END
$$;

-- Trigger mode.
GRANT USAGE ON SCHEMA citapulse TO citapulse_daemon;
-- The reader, replay, statistics, presence, revocations, reminders' scan and `citapulse check`.
GRANT SELECT ON citapulse.events, citapulse.inbox, citapulse.wakeup, citapulse.settings,
                citapulse.stats, citapulse.revocations, citapulse.presence,
                citapulse.presence_instances, citapulse.watches, citapulse.watched TO citapulse_daemon;
-- Pruning the log; writing back the tenants [[resolvers]] found (and so locking rows).
GRANT DELETE, UPDATE (tenant) ON citapulse.events TO citapulse_daemon;
-- The adaptive wake-up switch and the bulk threshold; pruned_upto after a prune. Not
-- capture, wal_slot or switches: only capture_mode() changes those.
GRANT UPDATE (notify, reason, changed_at, changed_by) ON citapulse.wakeup TO citapulse_daemon;
GRANT UPDATE (bulk_threshold, pruned_upto) ON citapulse.settings TO citapulse_daemon;
-- Shared statistics (a cache every daemon writes).
GRANT INSERT, UPDATE ON citapulse.stats TO citapulse_daemon;
GRANT USAGE ON SEQUENCE citapulse.stats_version TO citapulse_daemon;
-- /metrics' citapulse_oversized_tenant_rows.
GRANT SELECT ON SEQUENCE citapulse.oversized_tenant_rows TO citapulse_daemon;
GRANT EXECUTE ON FUNCTION
    citapulse.version(),
    citapulse.event_type(text, text, jsonb, jsonb),
    citapulse.event_data(citapulse.events),
    citapulse.take_inbox(bigint[]),
    citapulse.presence_write(text, integer, text[], text[], text[], integer[], double precision[], integer),
    citapulse.reminder_table_problem(regclass),
    citapulse.unzoned_tenants(regclass, double precision, integer),
    citapulse.set_tenant_zone(text, text),
    citapulse.due_reminders(regclass, integer[], text[], text, timestamptz, timestamptz, double precision, integer),
    citapulse.record_late_reminders(regclass, integer[], text[], text, timestamptz, double precision, integer),
    citapulse.fire_reminders(regclass, text[], integer[], timestamptz[], text[], text[], boolean[]),
    citapulse.prune_reminders_sent(),
    -- POST /notify/cita publishes through it.
    citapulse.emit(text, text, jsonb)
TO citapulse_daemon;

-- The daemon VACUUMs the inbox it empties; before PostgreSQL 17 only the owner may (the
-- daemon's VACUUM is then skipped with a warning, and autovacuum, tuned for the inbox by
-- install.sql, does it).
DO $$
BEGIN
    IF current_setting('server_version_num')::integer >= 170000 THEN
        EXECUTE 'GRANT MAINTAIN ON citapulse.inbox TO citapulse_daemon';
    END IF;
END
$$;

-- The watched tables, for the statistics query (re-run after watching more).
DO $$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT w.tbl FROM citapulse.watches w ORDER BY w.tbl LOOP
        EXECUTE format('GRANT SELECT ON TABLE %s TO citapulse_daemon', t);
    END LOOP;
END
$$;

-- WAL mode: the daemon writes the decoded rows to the log itself, and where it stands.
GRANT INSERT ON citapulse.events TO citapulse_daemon_wal;
GRANT USAGE ON SEQUENCE citapulse.events_id_seq, citapulse.oversized_tenant_rows TO citapulse_daemon_wal;
GRANT INSERT ON citapulse.wal_position TO citapulse_daemon_wal;
GRANT SELECT ON citapulse.wal_position TO citapulse_daemon_wal;
GRANT EXECUTE ON FUNCTION
    citapulse.row_routes(text[], jsonb, jsonb),
    citapulse.count_oversized_tenant(),
    citapulse.wal_confirm(text, pg_lsn, boolean, bigint, boolean),
    citapulse.wal_drop_slot(text)
TO citapulse_daemon_wal;

COMMIT;
