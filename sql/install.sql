-- citapulse: install (idempotent; run with psql -f sql/install.sql, as often as you like).
--
-- Creates schema citapulse with:
--   citapulse.events    the durable change log (what makes delivery lossless)
--   citapulse.wakeup    one row: whether the triggers call pg_notify (adaptive wake-up)
--   citapulse.settings  one row: knobs the daemon writes and the triggers read
--   citapulse.watch(), citapulse.unwatch(), citapulse.emit(), citapulse.version()
-- User tables are never altered; watch() only adds triggers named citapulse_*.
-- Running it over an older install migrates it in place: the log and its ids are kept.
--
-- Privileges: nothing here is granted to PUBLIC. The installing role owns everything and
-- may watch tables; an application writes through the triggers (SECURITY DEFINER) with
-- no grant at all, and needs `GRANT USAGE ON SCHEMA citapulse` plus
-- `GRANT EXECUTE ON FUNCTION citapulse.emit(text, text, jsonb)` only to publish events.

BEGIN;
SET LOCAL client_min_messages = warning;

CREATE SCHEMA IF NOT EXISTS citapulse;

-- The version the daemon checks at start-up; bump on any incompatible change.
CREATE OR REPLACE FUNCTION citapulse.version() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 2 $$;

-- One row per changed row (or one calendar_refresh per tenant for a bulk statement).
-- xid and horizon make replay lossless when transactions commit out of id order:
-- every event committing after event X was written has xid >= X.horizon.
CREATE TABLE IF NOT EXISTS citapulse.events (
    id          bigserial PRIMARY KEY,
    tenant      text,                            -- NULL: TRUNCATE (every tenant) or not yet resolved
    kind        text        NOT NULL,            -- event family: appointment, schedule, custom
    event_type  text        NOT NULL,            -- message type sent to clients
    tbl         text,                            -- schema.table, NULL for emit()
    op          text        NOT NULL,            -- INSERT UPDATE DELETE TRUNCATE EMIT
    row_data    jsonb,                           -- new row (INSERT/UPDATE) or deleted row
    old_data    jsonb,                           -- old row (UPDATE/DELETE)
    payload     jsonb,                           -- emit() data, calendar_refresh details
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    horizon     xid8        NOT NULL DEFAULT pg_snapshot_xmin(pg_current_snapshot()),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Version 1 marked "every tenant" and "resolve me" with the tenant values '*' and '',
-- which an application row could also hold (and so reach every tenant). Both are now out
-- of band: a NULL tenant, told apart by op. Idempotent: version 2 writes neither marker.
ALTER TABLE citapulse.events ALTER COLUMN tenant DROP NOT NULL;
UPDATE citapulse.events SET tenant = NULL WHERE tenant = '*' AND op = 'TRUNCATE';
UPDATE citapulse.events e SET tenant = NULL
 WHERE e.tenant = '' AND e.tbl IN (
       SELECT format('%I.%I', n.nspname, c.relname)
         FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE t.tgname = 'citapulse_insert' AND t.tgnargs >= 1 AND position('\x00'::bytea IN t.tgargs) = 1);
-- Replay of one tenant's channel.
CREATE INDEX IF NOT EXISTS events_tenant_id_idx ON citapulse.events (tenant, id);
-- Late commits: the daemon re-reads events of transactions that were in progress.
CREATE INDEX IF NOT EXISTS events_xid_idx ON citapulse.events (xid);
-- Pruning by age: BRIN stays tiny and cheap to maintain because created_at grows with id.
CREATE INDEX IF NOT EXISTS events_created_brin ON citapulse.events USING brin (created_at) WITH (pages_per_range = 16, autosummarize = on);

CREATE TABLE IF NOT EXISTS citapulse.wakeup (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    notify      boolean     NOT NULL DEFAULT true,
    reason      text        NOT NULL DEFAULT 'installed',
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text
);
INSERT INTO citapulse.wakeup (singleton) VALUES (true) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS citapulse.settings (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    bulk_threshold  integer NOT NULL DEFAULT 100 CHECK (bulk_threshold >= 0),
    -- Highest event id ever pruned: a resume from below it answers history_expired.
    pruned_upto     bigint  NOT NULL DEFAULT 0
);
INSERT INTO citapulse.settings (singleton) VALUES (true) ON CONFLICT DO NOTHING;

-- Rows skipped because their tenant value is longer than 255 bytes (capture()):
-- a sequence, so counting takes no lock and never rolls back with the app's statement.
CREATE SEQUENCE IF NOT EXISTS citapulse.oversized_tenant_rows;

-- Counts one skipped row; always false, so it can close a CASE in a WHERE clause.
CREATE OR REPLACE FUNCTION citapulse.count_oversized_tenant() RETURNS boolean
LANGUAGE sql VOLATILE AS $$ SELECT nextval('citapulse.oversized_tenant_rows') < 0 $$;

-- The latest statistics of each tenant, shared by every daemon on this database: one
-- daemon computes (holding an advisory lock), the others reuse the row when its snapshot
-- already sees the events they read.
CREATE TABLE IF NOT EXISTS citapulse.stats (
    tenant       text PRIMARY KEY,
    message      text        NOT NULL,
    day          text        NOT NULL,
    snap         pg_snapshot NOT NULL,
    computed_at  timestamptz NOT NULL DEFAULT now(),
    computed_by  text
);
-- Every write of a row takes a new version; `NOTIFY citapulse_stats` carries no data (any
-- login may LISTEN), so the other daemons read the rows above the version they last saw.
CREATE SEQUENCE IF NOT EXISTS citapulse.stats_version;
ALTER TABLE citapulse.stats ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT nextval('citapulse.stats_version');
CREATE INDEX IF NOT EXISTS stats_version_idx ON citapulse.stats (version);

-- The event type of one changed row, by family.
CREATE OR REPLACE FUNCTION citapulse.event_type(kind text, op text, new_row jsonb, old_row jsonb)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN kind = 'appointment' THEN
            CASE op
                WHEN 'INSERT' THEN 'cita_created'
                WHEN 'DELETE' THEN 'cita_deleted'
                ELSE CASE
                    WHEN new_row -> 'estado' IS DISTINCT FROM old_row -> 'estado' THEN 'status_changed'
                    WHEN new_row -> 'fecha' IS DISTINCT FROM old_row -> 'fecha'
                      OR new_row -> 'hora_inicio' IS DISTINCT FROM old_row -> 'hora_inicio'
                      OR new_row -> 'hora_fin' IS DISTINCT FROM old_row -> 'hora_fin' THEN 'cita_rescheduled'
                    ELSE 'cita_updated'
                END
            END
        WHEN kind = 'schedule' THEN 'schedule_updated'
        ELSE kind || '_' || CASE op WHEN 'INSERT' THEN 'created' WHEN 'DELETE' THEN 'deleted' ELSE 'updated' END
    END
$$;

-- The `data` object of the message clients receive for one log row. The daemon sends
-- {"type": event_type, "channel": "estadisticas:<tenant>", "id": id, "data": event_data(e)}.
CREATE OR REPLACE FUNCTION citapulse.event_data(e citapulse.events) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN e.op = 'EMIT' THEN coalesce(e.payload, '{}'::jsonb)
        WHEN e.event_type = 'calendar_refresh' THEN
            e.payload || jsonb_build_object('table', e.tbl, 'timestamp', floor(extract(epoch FROM e.created_at))::bigint)
        ELSE jsonb_build_object(
                 'action', CASE e.op WHEN 'INSERT' THEN 'created' WHEN 'DELETE' THEN 'deleted' ELSE 'updated' END,
                 'table', e.tbl,
                 'row', coalesce(e.row_data, e.old_data),
                 'old', e.old_data,
                 'timestamp', floor(extract(epoch FROM e.created_at))::bigint)
             || CASE WHEN e.kind = 'schedule' THEN jsonb_build_object(
                 'profesional_id', coalesce(e.row_data, e.old_data) -> 'profesional_id',
                 'dia_semana', coalesce(e.row_data, e.old_data) -> 'dia_semana')
                ELSE '{}'::jsonb END
    END
$$;

-- Writes one statement's changes to the log, then wakes the daemon while notifying is on.
-- It must never make the application's statement fail on data: rows with a NULL tenant
-- are skipped, so are (and counted) tenant values over 255 bytes (never subscribable:
-- channel names allow 64 characters; and too big for the (tenant, id) index), and every
-- column type travels through to_jsonb. The tenant is whatever the row holds, always
-- literal: no value means "every tenant". The NOTIFY payload is empty: any database login
-- may LISTEN, so it carries neither tenants nor ids; rows travel through the log.
--
-- Cost matters: this runs inside every write of the legacy app. The usual statement
-- (at most events.bulk_threshold rows) costs one small read of the two singleton rows, one
-- INSERT ... SELECT straight from the transition table and, while notifying, one
-- pg_notify. A statement changing more than settings.bulk_threshold rows of one tenant
-- logs a single calendar_refresh for that tenant instead of one event per row.
-- TG_ARGV: [0] tenant column ('' = resolved by the daemon's [[resolvers]]: NULL tenant),
-- [1] kind.
CREATE OR REPLACE FUNCTION citapulse.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tenant_col text := TG_ARGV[0];
    resolved   boolean := TG_ARGV[0] = '';
    fam        text := TG_ARGV[1];
    tname      text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
    max_len    constant integer := 255;
    total      bigint;
    threshold  integer;
    notifying  boolean;
    logged     bigint;
    news       jsonb[];
    olds       jsonb[];
BEGIN
    IF TG_OP = 'DELETE' THEN
        SELECT (SELECT count(*) FROM citapulse_old),
               coalesce((SELECT s.bulk_threshold FROM citapulse.settings s), 100),
               coalesce((SELECT w.notify FROM citapulse.wakeup w), true)
          INTO total, threshold, notifying;
    ELSE
        SELECT (SELECT count(*) FROM citapulse_new),
               coalesce((SELECT s.bulk_threshold FROM citapulse.settings s), 100),
               coalesce((SELECT w.notify FROM citapulse.wakeup w), true)
          INTO total, threshold, notifying;
    END IF;
    IF total = 0 THEN
        RETURN NULL;
    END IF;

    IF total <= threshold THEN
        -- No tenant can be over the threshold: every row is its own event. OFFSET 0 keeps
        -- the planner from inlining to_jsonb() into each use (it would run three times a row);
        -- The sub-selects take the transaction id and snapshot horizon once per statement,
        -- not per row (an earlier horizon is only more conservative). The CASE keeps the
        -- counting function off every row but the oversized ones.
        IF TG_OP = 'INSERT' THEN
            INSERT INTO citapulse.events (tenant, kind, event_type, tbl, op, row_data, xid, horizon)
            SELECT c.tenant, fam, citapulse.event_type(fam, 'INSERT', c.r, NULL), tname, 'INSERT', c.r,
                   (SELECT pg_current_xact_id()), (SELECT pg_snapshot_xmin(pg_current_snapshot()))
              FROM (SELECT j.r, CASE WHEN resolved THEN NULL ELSE j.r ->> tenant_col END AS tenant
                      FROM (SELECT to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
             WHERE CASE WHEN resolved THEN true WHEN c.tenant IS NULL THEN false
                        WHEN octet_length(c.tenant) <= max_len THEN true
                        ELSE citapulse.count_oversized_tenant() END;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO citapulse.events (tenant, kind, event_type, tbl, op, old_data, xid, horizon)
            SELECT c.tenant, fam, citapulse.event_type(fam, 'DELETE', NULL, c.o), tname, 'DELETE', c.o,
                   (SELECT pg_current_xact_id()), (SELECT pg_snapshot_xmin(pg_current_snapshot()))
              FROM (SELECT j.o, CASE WHEN resolved THEN NULL ELSE j.o ->> tenant_col END AS tenant
                      FROM (SELECT to_jsonb(d.*) AS o FROM citapulse_old d OFFSET 0) j) c
             WHERE CASE WHEN resolved THEN true WHEN c.tenant IS NULL THEN false
                        WHEN octet_length(c.tenant) <= max_len THEN true
                        ELSE citapulse.count_oversized_tenant() END;
        ELSE
            -- PostgreSQL fills both transition tables of an UPDATE in the same order, so
            -- the i-th new row pairs with the i-th old row.
            INSERT INTO citapulse.events (tenant, kind, event_type, tbl, op, row_data, old_data, xid, horizon)
            SELECT c.tenant, fam, citapulse.event_type(fam, 'UPDATE', c.r, c.o), tname, 'UPDATE', c.r, c.o,
                   (SELECT pg_current_xact_id()), (SELECT pg_snapshot_xmin(pg_current_snapshot()))
              FROM (SELECT n.r, d.o, CASE WHEN resolved THEN NULL ELSE n.r ->> tenant_col END AS tenant
                      FROM (SELECT to_jsonb(x.*) AS r, row_number() OVER () AS i FROM citapulse_new x) n
                      JOIN (SELECT to_jsonb(x.*) AS o, row_number() OVER () AS i FROM citapulse_old x) d
                        ON d.i = n.i) c
             WHERE CASE WHEN resolved THEN true WHEN c.tenant IS NULL THEN false
                        WHEN octet_length(c.tenant) <= max_len THEN true
                        ELSE citapulse.count_oversized_tenant() END;
        END IF;
        IF FOUND AND notifying THEN
            PERFORM pg_notify('citapulse', '');
        END IF;
        RETURN NULL;
    END IF;

    -- A statement bigger than the threshold: count rows per tenant first.
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT array_agg(to_jsonb(t.*)) INTO news FROM citapulse_new t;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT array_agg(to_jsonb(t.*)) INTO olds FROM citapulse_old t;
    END IF;
    WITH changed AS (
        SELECT news[i] AS r, olds[i] AS o
          FROM generate_subscripts(coalesce(news, olds), 1) AS i
    ), kept AS MATERIALIZED (
        SELECT c.r, c.o, c.tenant
          FROM (SELECT r, o, CASE WHEN resolved THEN NULL ELSE coalesce(r, o) ->> tenant_col END AS tenant
                  FROM changed) c
         WHERE CASE WHEN resolved THEN true WHEN c.tenant IS NULL THEN false
                    WHEN octet_length(c.tenant) <= max_len THEN true
                    ELSE citapulse.count_oversized_tenant() END
    ), per_tenant AS (
        -- Rows whose tenant the daemon resolves are never folded: their tenant is unknown.
        SELECT tenant, count(*) AS n FROM kept WHERE NOT resolved GROUP BY tenant
    ), written AS (
        INSERT INTO citapulse.events (tenant, kind, event_type, tbl, op, row_data, old_data, payload)
        SELECT k.tenant, fam, citapulse.event_type(fam, TG_OP, k.r, k.o), tname, TG_OP, k.r, k.o, NULL
          FROM kept k LEFT JOIN per_tenant p ON p.tenant = k.tenant
         WHERE resolved OR p.n <= threshold
        UNION ALL
        SELECT p.tenant, fam, 'calendar_refresh', tname, TG_OP, NULL, NULL,
               jsonb_build_object('reason', 'bulk', 'rows', p.n, 'action', lower(TG_OP))
          FROM per_tenant p
         WHERE p.n > threshold
        RETURNING 1
    )
    SELECT count(*) INTO logged FROM written;

    IF notifying AND logged > 0 THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
    RETURN NULL;
END
$$;

-- A TRUNCATE removes rows without transition tables: one calendar_refresh for every tenant
-- (a NULL tenant with op TRUNCATE); the daemon hands it to the tenants that have subscribers.
CREATE OR REPLACE FUNCTION citapulse.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO citapulse.events (tenant, kind, event_type, tbl, op, payload)
    VALUES (NULL, TG_ARGV[0], 'calendar_refresh', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            'TRUNCATE', jsonb_build_object('reason', 'truncate', 'action', 'truncate'));
    IF coalesce((SELECT notify FROM citapulse.wakeup), true) THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
    RETURN NULL;
END
$$;

-- Attaches the four triggers (one per operation: transition tables allow one event each).
-- Calling it again replaces them, so changing tenant_column or kind is one call.
-- tenant_column => NULL watches a table without one: the daemon resolves each row's
-- tenant with a [[resolvers]] query from its config.
CREATE OR REPLACE FUNCTION citapulse.watch(tbl regclass, tenant_column text, kind text DEFAULT 'appointment')
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF kind IS NULL OR kind !~ '^[a-z][a-z0-9_]{0,40}$' THEN
        RAISE EXCEPTION 'citapulse.watch: kind must match ^[a-z][a-z0-9_]{0,40}$ (got %)', kind;
    END IF;
    IF tenant_column IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = tbl AND attname = tenant_column AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'citapulse.watch: table % has no column %', tbl, tenant_column;
    END IF;
    tenant_column := coalesce(tenant_column, '');
    PERFORM citapulse.unwatch(tbl);
    EXECUTE format('CREATE TRIGGER citapulse_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS citapulse_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture(%L, %L)', tbl, tenant_column, kind);
    EXECUTE format('CREATE TRIGGER citapulse_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS citapulse_old NEW TABLE AS citapulse_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture(%L, %L)', tbl, tenant_column, kind);
    EXECUTE format('CREATE TRIGGER citapulse_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS citapulse_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture(%L, %L)', tbl, tenant_column, kind);
    EXECUTE format('CREATE TRIGGER citapulse_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture_truncate(%L)', tbl, kind);
END
$$;

CREATE OR REPLACE FUNCTION citapulse.unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    trg name;
BEGIN
    FOR trg IN SELECT t.tgname FROM pg_trigger t
                WHERE t.tgrelid = tbl AND NOT t.tgisinternal
                  AND t.tgfoid IN ('citapulse.capture'::regproc, 'citapulse.capture_truncate'::regproc)
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trg, tbl);
    END LOOP;
END
$$;

-- The watched tables, for `citapulse check` and DBAs.
CREATE OR REPLACE VIEW citapulse.watched AS
SELECT t.tgrelid::regclass AS tbl,
       count(*) AS triggers,
       array_agg(t.tgname::text ORDER BY t.tgname) AS trigger_names
  FROM pg_trigger t
 WHERE NOT t.tgisinternal
   AND t.tgfoid IN ('citapulse.capture'::regproc, 'citapulse.capture_truncate'::regproc)
 GROUP BY t.tgrelid;

-- Message types the daemon itself sends: an emitted event may not pose as one of them.
CREATE OR REPLACE FUNCTION citapulse.reserved_event_types() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['connected', 'subscribed', 'unsubscribed', 'stats', 'error', 'pong',
                 'reauthenticated', 'presence', 'presence_join', 'presence_leave', 'auth',
                 'ping', 'subscribe', 'unsubscribe']
$$;

-- Publishes a custom event in the caller's transaction: delivered only if it commits.
-- The tenant is one channel's tenant (what a channel name may hold): there is no
-- "every tenant" address.
CREATE OR REPLACE FUNCTION citapulse.emit(tenant text, event_type text, data jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
BEGIN
    IF tenant IS NULL OR tenant !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'citapulse.emit: tenant must match ^[A-Za-z0-9_.-]{1,64}$ (the tenant of one channel)';
    END IF;
    IF event_type IS NULL OR event_type !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,63}$' THEN
        RAISE EXCEPTION 'citapulse.emit: event_type must match ^[A-Za-z][A-Za-z0-9_.:-]{0,63}$';
    END IF;
    IF lower(event_type) = ANY (citapulse.reserved_event_types()) THEN
        RAISE EXCEPTION 'citapulse.emit: event_type % is reserved for messages of the server', event_type;
    END IF;
    INSERT INTO citapulse.events (tenant, kind, event_type, op, payload)
    VALUES (tenant, 'custom', event_type, 'EMIT', coalesce(data, '{}'::jsonb))
    RETURNING id INTO new_id;
    IF coalesce((SELECT notify FROM citapulse.wakeup), true) THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
    RETURN new_id;
END
$$;

-- Nothing for PUBLIC: a login that may create a table (a temporary one will do) must not
-- be able to attach capture() and forge events for any tenant, nor emit without a grant.
-- CREATE TRIGGER needs EXECUTE on the trigger function; firing does not, so application
-- writes need no grant. Grant watch/unwatch (and capture, capture_truncate) to DBA roles,
-- emit to applications that publish events.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA citapulse FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA citapulse FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA citapulse FROM PUBLIC;

COMMIT;
