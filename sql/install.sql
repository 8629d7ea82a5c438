-- citapulse: install (idempotent; run with psql -f sql/install.sql, as often as you like).
--
-- Creates schema citapulse with:
--   citapulse.inbox     what the triggers write: the changed rows, nothing else indexed
--   citapulse.events    the durable change log the daemon reads and replays from (what
--                       makes delivery lossless): the daemon moves the inbox into it
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

-- The version this script upgrades (0: a new install), for the steps only an old
-- install needs (see the end of the script).
DO $$
DECLARE
    v integer := 0;
BEGIN
    IF pg_catalog.to_regprocedure('citapulse.version()') IS NOT NULL THEN
        EXECUTE 'SELECT citapulse.version()' INTO v;
    END IF;
    PERFORM pg_catalog.set_config('citapulse.upgrading_from', v::text, true);
END
$$;

CREATE SCHEMA IF NOT EXISTS citapulse;

-- The version the daemon checks at start-up; bump on any incompatible change.
CREATE OR REPLACE FUNCTION citapulse.version() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 11 $$;
-- Version 11: citapulse.after_restore(), the step after restoring a dump into another
-- cluster (or an older backup): the log's transaction ids are made this cluster's past.
-- Version 10: citapulse.reserved_event_types() is the server's own message types
-- (`authenticated` added, `reauthenticated`, which the server never sends, dropped);
-- on PostgreSQL 17+ capture_mode('wal') creates a failover slot; a row moved to another
-- tenant is logged as its removal from the old tenant and its arrival in the new one,
-- each with its own row only (capture(), event_data()).
-- Version 9: bulk statements are linear in their rows (capture()), reminders are read in
-- pages and fired in batches (due_reminders' limit, record_late_reminders,
-- fire_reminders, which replaces fire_reminder).

-- One row per changed row (or one calendar_refresh per tenant for a bulk statement).
-- Since version 4 the triggers write citapulse.inbox and a daemon moves committed inbox
-- rows here in batches (citapulse.move_inbox), keeping their ids: the replay indexes
-- below cost the daemon, not the application's commits. xid and horizon are those of
-- the transaction that made the row visible here (the mover's; the writer's before
-- version 4), and make replay lossless when rows arrive out of id order: every event
-- arriving after event X arrived has xid >= X.horizon.
CREATE TABLE IF NOT EXISTS citapulse.events (
    id          bigserial PRIMARY KEY,
    tenant      text,                            -- NULL: TRUNCATE (every tenant) or not yet resolved
    kind        text        NOT NULL,            -- event family: appointment, schedule, custom
    event_type  text,                            -- message type; NULL: classified when read
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
-- Version 3 classifies rows when the daemon reads them, off the app's commit path.
ALTER TABLE citapulse.events ALTER COLUMN event_type DROP NOT NULL;
UPDATE citapulse.events SET tenant = NULL WHERE tenant = '*' AND op = 'TRUNCATE';
UPDATE citapulse.events e SET tenant = NULL
 WHERE e.tenant = '' AND e.tbl IN (
       SELECT format('%I.%I', n.nspname, c.relname)
         FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE t.tgname = 'citapulse_insert' AND t.tgnargs >= 1 AND position('\x00'::bytea IN t.tgargs) = 1);
-- Version 8: the people an event also goes to (DESIGN.md §8), as 'u:<user>' (the channel
-- usuario:<tenant>:<user>), 'r:<role>' (rol:<tenant>:<role>) and 'u:*' (every user channel
-- of the tenant: a calendar_refresh of a table with route columns). NULL: nobody besides
-- the tenant's channel. Filled when the daemon moves a row here, never by the app's write.
ALTER TABLE citapulse.events ADD COLUMN IF NOT EXISTS routes text[];
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

-- What the triggers write, inside the application's transaction: the rows and what
-- cannot be recovered later (tenant, table, op, kind, time). Only its key is indexed,
-- and ids come from the log's sequence, so a row keeps its id when the daemon moves it
-- to citapulse.events. A committed inbox row is an event not yet moved; rows of
-- transactions still running are invisible to the mover and moved once they commit.
CREATE TABLE IF NOT EXISTS citapulse.inbox (
    id          bigint      PRIMARY KEY DEFAULT nextval('citapulse.events_id_seq'),
    tenant      text,
    kind        text        NOT NULL,
    event_type  text,
    tbl         text,
    op          text        NOT NULL,
    row_data    jsonb,
    old_data    jsonb,
    payload     jsonb,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Only emit_to_user()/emit_to_role() write routes here; a watched row's routes are
-- computed when it is moved (off the app's commit path).
-- Rows live here for milliseconds: vacuum often so the mover's key scan stays short.
-- Every application write to a watched table holds a lock on the inbox until it commits,
-- and ALTER TABLE waits for all of them (and makes new writes queue behind it): only
-- when something is to change, so running this script again leaves the writes alone.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                    WHERE attrelid = 'citapulse.inbox'::regclass AND attname = 'routes' AND NOT attisdropped) THEN
        ALTER TABLE citapulse.inbox ADD COLUMN routes text[];
    END IF;
    IF NOT coalesce((SELECT c.reloptions @> ARRAY['autovacuum_vacuum_scale_factor=0', 'autovacuum_vacuum_threshold=2000',
                                                  'autovacuum_vacuum_insert_scale_factor=0', 'autovacuum_vacuum_insert_threshold=2000']
                       FROM pg_catalog.pg_class c WHERE c.oid = 'citapulse.inbox'::regclass), false) THEN
        ALTER TABLE citapulse.inbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
                                         autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 2000);
    END IF;
END
$$;

-- Whether the triggers notify, as a function the planner folds into a constant: reading
-- citapulse.wakeup on every write cost the application about as much as the rest of
-- capture(). An UPDATE of citapulse.wakeup.notify (the daemon's adaptive switch)
-- replaces its body; PostgreSQL then re-plans the one expression that inlined it, in
-- every session, at its next statement. Not SECURITY DEFINER: that would stop inlining.
CREATE OR REPLACE FUNCTION citapulse.notifying() RETURNS boolean
LANGUAGE sql STABLE AS $$ SELECT true $$;

CREATE OR REPLACE FUNCTION citapulse.set_notifying(notify boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('CREATE OR REPLACE FUNCTION citapulse.notifying() RETURNS boolean LANGUAGE sql STABLE AS %L',
                   CASE WHEN notify IS NOT FALSE THEN 'SELECT true' ELSE 'SELECT false' END);
END
$$;

-- The row lock of the UPDATE serialises concurrent switches (two daemons replacing the
-- function at once would fail with "tuple concurrently updated").
CREATE OR REPLACE FUNCTION citapulse.wakeup_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM citapulse.set_notifying(NEW.notify);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS citapulse_wakeup_changed ON citapulse.wakeup;
CREATE TRIGGER citapulse_wakeup_changed AFTER UPDATE OF notify ON citapulse.wakeup
    FOR EACH ROW WHEN (old.notify IS DISTINCT FROM new.notify)
    EXECUTE FUNCTION citapulse.wakeup_changed();
SELECT citapulse.set_notifying(w.notify) FROM citapulse.wakeup w;

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
-- Called from capture(), which has no fixed search_path: everything is qualified.
CREATE OR REPLACE FUNCTION citapulse.count_oversized_tenant() RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT pg_catalog.nextval('citapulse.oversized_tenant_rows'::pg_catalog.regclass) OPERATOR(pg_catalog.<) 0
$$;

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
        WHEN e.op IN ('EMIT', 'EMIT_TO', 'REMINDER') THEN coalesce(e.payload, '{}'::jsonb)
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
             -- Half of a row moved to another tenant (version 10): capture() marks it.
             || CASE WHEN e.payload -> 'moved' = 'true'::jsonb THEN '{"moved": true}'::jsonb ELSE '{}'::jsonb END
    END
$$;

-- Writes one statement's changes to the log, then wakes the daemon while notifying is on.
-- It must never make the application's statement fail on data: rows with a NULL tenant
-- are skipped, and tenant values over 255 bytes (never subscribable: channel names allow
-- 64 characters; and too big for the log's (tenant, id) index) are dropped and counted
-- when the daemon moves the inbox (the bulk path below drops them itself), and every
-- column type travels through to_jsonb. The tenant is whatever the row holds, always
-- literal: no value means "every tenant". The NOTIFY payload is empty: any database login
-- may LISTEN, so it carries neither tenants nor ids; rows travel through the log.
--
-- Cost matters: this runs inside every write of the legacy app, so it holds only what
-- must be in the app's transaction (row, old row, table, op, tenant, kind), into the
-- inbox (key only); the daemon moves it to the indexed log and classifies the event
-- type when it reads it (event_type NULL). The usual statement (at most the bulk
-- threshold, TG_ARGV[2], rows) costs one INSERT ... SELECT straight from the transition
-- table, whose count is an InitPlan of that same statement; while notifying (a
-- constant, see citapulse.notifying()), one pg_notify.
-- A statement changing more than the threshold of one tenant's rows logs a single
-- calendar_refresh for that tenant instead (the rare path below).
--
-- No SET search_path (it costs every call a GUC save/restore and a search-path
-- rebuild, measured at about 5% of a single-row INSERT's throughput): instead every
-- function, operator and type below is schema-qualified, so a caller's search_path
-- cannot substitute its own objects into this SECURITY DEFINER function. Keep it so.
-- TG_ARGV: [0] tenant column ('' = resolved by the daemon's [[resolvers]]: NULL tenant),
-- [1] kind, [2] bulk threshold (watch() copies citapulse.settings.bulk_threshold).
CREATE OR REPLACE FUNCTION citapulse.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    tenant_col pg_catalog.text := TG_ARGV[0];
    fam        pg_catalog.text := TG_ARGV[1];
    threshold  pg_catalog.int4 := COALESCE(TG_ARGV[2], '100');
    total      pg_catalog.int8;
    logged     pg_catalog.int8;
    oversized  pg_catalog.int8;
    tenant_expr pg_catalog.text;
BEGIN
    -- The usual statement: every row is its own event, unless the statement is bigger
    -- than the threshold (the InitPlan count then lets nothing through). OFFSET 0 keeps
    -- the planner from inlining to_jsonb() into each use. The sub-select takes the table
    -- name once per statement, not per row. Oversized tenants are dropped (and counted)
    -- by citapulse.move_inbox(), off the commit path: the inbox has no tenant index.
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO citapulse.inbox (tenant, kind, tbl, op, row_data)
        SELECT c.tenant, fam, (SELECT pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)), 'INSERT', c.r
          FROM (SELECT j.r, CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN NULL
                                 ELSE j.r OPERATOR(pg_catalog.->>) tenant_col END AS tenant
                  FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
         WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) threshold
           AND (c.tenant IS NOT NULL OR tenant_col OPERATOR(pg_catalog.=) '');
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        INSERT INTO citapulse.inbox (tenant, kind, tbl, op, old_data)
        SELECT c.tenant, fam, (SELECT pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)), 'DELETE', c.o
          FROM (SELECT j.o, CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN NULL
                                 ELSE j.o OPERATOR(pg_catalog.->>) tenant_col END AS tenant
                  FROM (SELECT pg_catalog.to_jsonb(d.*) AS o FROM citapulse_old d OFFSET 0) j) c
         WHERE (SELECT pg_catalog.count(*) FROM citapulse_old) OPERATOR(pg_catalog.<=) threshold
           AND (c.tenant IS NOT NULL OR tenant_col OPERATOR(pg_catalog.=) '');
    ELSE
        -- PostgreSQL fills both transition tables of an UPDATE in the same order, so
        -- the i-th new row pairs with the i-th old row. A row moved to another tenant
        -- (version 10) is two events, so neither tenant sees the other's values: its
        -- removal from the old tenant (old row only, as a DELETE) and then its arrival in
        -- the new one (new row only, as an INSERT), both marked moved. Comparisons are
        -- qualified operators: IS DISTINCT FROM would look `=` up in the caller's path.
        -- OFFSET 0: each row is turned into JSON once, however often its tenant is read.
        INSERT INTO citapulse.inbox (tenant, kind, tbl, op, row_data, old_data, payload)
        SELECT u.tenant, fam, (SELECT pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)), u.op, u.r, u.o, u.p
          FROM (SELECT p.r, p.o, p.nt, p.ot,
                       CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN false
                            WHEN p.nt IS NULL OR p.ot IS NULL THEN (p.nt IS NULL) OPERATOR(pg_catalog.<>) (p.ot IS NULL)
                            ELSE p.nt OPERATOR(pg_catalog.<>) p.ot END AS moved
                  FROM (SELECT n.r, d.o,
                               CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN NULL
                                    ELSE n.r OPERATOR(pg_catalog.->>) tenant_col END AS nt,
                               CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN NULL
                                    ELSE d.o OPERATOR(pg_catalog.->>) tenant_col END AS ot
                          FROM (SELECT pg_catalog.to_jsonb(x.*) AS r, pg_catalog.row_number() OVER () AS i FROM citapulse_new x) n
                          JOIN (SELECT pg_catalog.to_jsonb(x.*) AS o, pg_catalog.row_number() OVER () AS i FROM citapulse_old x) d
                            ON d.i OPERATOR(pg_catalog.=) n.i OFFSET 0) p) c
         CROSS JOIN LATERAL (VALUES
                (c.moved, c.ot, 'DELETE', NULL::pg_catalog.jsonb, c.o, '{"moved": true}'::pg_catalog.jsonb),
                (true, c.nt, CASE WHEN c.moved THEN 'INSERT' ELSE 'UPDATE' END, c.r,
                 CASE WHEN c.moved THEN NULL ELSE c.o END,
                 CASE WHEN c.moved THEN '{"moved": true}'::pg_catalog.jsonb END)) u(keep, tenant, op, r, o, p)
         WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) threshold
           AND u.keep AND (u.tenant IS NOT NULL OR tenant_col OPERATOR(pg_catalog.=) '');
    END IF;
    IF FOUND THEN
        IF citapulse.notifying() THEN
            PERFORM pg_catalog.pg_notify('citapulse', '');
        END IF;
        RETURN NULL;
    END IF;

    -- Nothing logged: an empty statement, rows without a tenant, or a bulk statement.
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        SELECT pg_catalog.count(*) INTO total FROM citapulse_old;
    ELSE
        SELECT pg_catalog.count(*) INTO total FROM citapulse_new;
    END IF;
    IF total OPERATOR(pg_catalog.<=) threshold THEN
        RETURN NULL;
    END IF;
    -- A bulk statement, linear in its rows: one pass lists each row's events by tenant
    -- from the tenant column alone (no row copies) and counts them per tenant, a second
    -- turns into JSON only the rows of tenants at most at the threshold (hash joins, no
    -- array subscripts: reading element i of a jsonb[] walks the array from its start,
    -- which made 100 000 rows take minutes). An UPDATE's i-th new row pairs with its
    -- i-th old row, numbered in the same pass; a row moved to another tenant is a
    -- removal (ord 0) and an arrival (ord 1) as above, counted for each tenant.
    -- Dynamic only to name the tenant column; still every name is schema-qualified (the
    -- caller's search_path applies to EXECUTE too). The transition tables are the
    -- trigger's own (ephemeral relations come before any schema).
    tenant_expr := CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN 'NULL::pg_catalog.text'
                        ELSE pg_catalog.format('pg_catalog.to_jsonb(x.%I) OPERATOR(pg_catalog.#>>) ''{}''::pg_catalog.text[]', tenant_col) END;
    EXECUTE pg_catalog.format($q$
        WITH units AS MATERIALIZED (
            %1$s
        ), counts AS MATERIALIZED (
            SELECT u.tenant, pg_catalog.count(*) AS n
              FROM units u WHERE u.tenant IS NOT NULL GROUP BY u.tenant
        ), kept AS (
            -- The one-time filter skips the second pass when every tenant is folded.
            SELECT u.i, u.ord, u.tenant, u.op, u.moved
              FROM units u
              JOIN counts c ON c.tenant OPERATOR(pg_catalog.=) u.tenant
             WHERE c.n OPERATOR(pg_catalog.<=) $1 AND pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255
               AND (SELECT pg_catalog.bool_or(s.n OPERATOR(pg_catalog.<=) $1
                                              AND pg_catalog.octet_length(s.tenant) OPERATOR(pg_catalog.<=) 255)
                      FROM counts s)
            UNION ALL
            -- Rows whose tenant the daemon resolves are never folded: their tenant is unknown.
            SELECT u.i, u.ord, NULL, u.op, u.moved FROM units u WHERE %2$s
        ), changed AS (
            %3$s
        ), written AS (
            INSERT INTO citapulse.inbox (tenant, kind, event_type, tbl, op, row_data, old_data, payload)
            SELECT c.tenant, $2, NULL, $3, c.op, c.r, c.o,
                   CASE WHEN c.moved THEN '{"moved": true}'::pg_catalog.jsonb END
              FROM changed c
            UNION ALL
            SELECT c.tenant, $2, 'calendar_refresh', $3, $4, NULL, NULL,
                   pg_catalog.jsonb_build_object('reason', 'bulk', 'rows', c.n, 'action', pg_catalog.lower($4))
              FROM counts c
             WHERE c.n OPERATOR(pg_catalog.>) $1 AND pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255
            RETURNING 1
        )
        SELECT (SELECT pg_catalog.count(*) FROM written),
               (SELECT pg_catalog.count(citapulse.count_oversized_tenant())
                  FROM counts c CROSS JOIN LATERAL pg_catalog.generate_series(1::pg_catalog.int8, c.n) g
                 WHERE pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.>) 255)
        $q$,
        -- units: (i, ord, tenant, op, moved), one per event a row may give.
        CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN pg_catalog.format(
                 'SELECT v.i, v.ord, v.tenant, v.op, v.moved '
                 '  FROM (SELECT p.i, p.nt, p.ot, CASE WHEN %2$s THEN false '
                 '                                    WHEN p.nt IS NULL OR p.ot IS NULL '
                 '                                    THEN (p.nt IS NULL) OPERATOR(pg_catalog.<>) (p.ot IS NULL) '
                 '                                    ELSE p.nt OPERATOR(pg_catalog.<>) p.ot END AS moved '
                 '          FROM (SELECT n.i, n.tenant AS nt, d.tenant AS ot '
                 '                  FROM (SELECT pg_catalog.row_number() OVER () AS i, %1$s AS tenant FROM citapulse_new x) n '
                 '                  JOIN (SELECT pg_catalog.row_number() OVER () AS i, %1$s AS tenant FROM citapulse_old x) d '
                 '                    ON d.i OPERATOR(pg_catalog.=) n.i) p) c '
                 ' CROSS JOIN LATERAL (VALUES (c.i, 0, c.ot, ''DELETE'', true, c.moved), '
                 '                            (c.i, 1, c.nt, CASE WHEN c.moved THEN ''INSERT'' ELSE ''UPDATE'' END, c.moved, true)) '
                 '       v(i, ord, tenant, op, moved, keep) '
                 ' WHERE v.keep',
                 tenant_expr, CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN 'true' ELSE 'false' END)
             ELSE pg_catalog.format(
                 'SELECT pg_catalog.row_number() OVER () AS i, 0 AS ord, %1$s AS tenant, %2$L::pg_catalog.text AS op, '
                 '       false AS moved FROM %3$s x',
                 tenant_expr, TG_OP,
                 CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN 'citapulse_old' ELSE 'citapulse_new' END) END,
        CASE WHEN tenant_col OPERATOR(pg_catalog.=) '' THEN 'true' ELSE 'false' END,
        CASE
            WHEN TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
                 'SELECT k.tenant, k.op, k.moved, pg_catalog.to_jsonb(n.rec) AS r, NULL::pg_catalog.jsonb AS o FROM kept k '
                 'JOIN (SELECT pg_catalog.row_number() OVER () AS i, x AS rec FROM citapulse_new x) n '
                 'ON n.i OPERATOR(pg_catalog.=) k.i ORDER BY k.i'
            WHEN TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
                 'SELECT k.tenant, k.op, k.moved, NULL::pg_catalog.jsonb AS r, pg_catalog.to_jsonb(d.rec) AS o FROM kept k '
                 'JOIN (SELECT pg_catalog.row_number() OVER () AS i, x AS rec FROM citapulse_old x) d '
                 'ON d.i OPERATOR(pg_catalog.=) k.i ORDER BY k.i'
            -- A removal carries the old row only, an arrival the new row only.
            ELSE 'SELECT k.tenant, k.op, k.moved, '
                 '       CASE WHEN k.ord OPERATOR(pg_catalog.=) 1 THEN pg_catalog.to_jsonb(n.rec) END AS r, '
                 '       CASE WHEN NOT k.moved OR k.ord OPERATOR(pg_catalog.=) 0 THEN pg_catalog.to_jsonb(d.rec) END AS o '
                 '  FROM kept k '
                 '  JOIN (SELECT pg_catalog.row_number() OVER () AS i, x AS rec FROM citapulse_new x) n '
                 '    ON n.i OPERATOR(pg_catalog.=) k.i '
                 '  JOIN (SELECT pg_catalog.row_number() OVER () AS i, x AS rec FROM citapulse_old x) d '
                 '    ON d.i OPERATOR(pg_catalog.=) k.i '
                 ' ORDER BY k.i, k.ord' END)
    INTO logged, oversized
    USING threshold, fam, pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), TG_OP;
    IF logged OPERATOR(pg_catalog.>) 0 AND citapulse.notifying() THEN
        PERFORM pg_catalog.pg_notify('citapulse', '');
    END IF;
    RETURN NULL;
END
$$;

-- A TRUNCATE removes rows without transition tables: one calendar_refresh for every tenant
-- (a NULL tenant with op TRUNCATE); the daemon hands it to the tenants that have subscribers.
CREATE OR REPLACE FUNCTION citapulse.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO citapulse.inbox (tenant, kind, event_type, tbl, op, payload)
    VALUES (NULL, TG_ARGV[0], 'calendar_refresh', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            'TRUNCATE', jsonb_build_object('reason', 'truncate', 'action', 'truncate'));
    IF citapulse.notifying() THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
    RETURN NULL;
END
$$;

-- How changes are captured (DESIGN.md §7): 'trigger' (the triggers below write the inbox)
-- or 'wal' (no trigger; the watched tables are in the publication citapulse and a daemon
-- streams them from the logical slot wal_slot). Switched by citapulse.capture_mode().
ALTER TABLE citapulse.settings ADD COLUMN IF NOT EXISTS capture text NOT NULL DEFAULT 'trigger';
ALTER TABLE citapulse.settings ADD COLUMN IF NOT EXISTS wal_slot text NOT NULL DEFAULT 'citapulse';
-- Counts mode switches; each writes its number into its WAL mark, so a daemon knows
-- when it has captured past the latest one (and may drop a drained slot).
ALTER TABLE citapulse.settings ADD COLUMN IF NOT EXISTS switches bigint NOT NULL DEFAULT 0;
ALTER TABLE citapulse.settings DROP CONSTRAINT IF EXISTS settings_capture_check;
ALTER TABLE citapulse.settings ADD CONSTRAINT settings_capture_check CHECK (capture IN ('trigger', 'wal'));

-- The arguments of a trigger (pg_trigger.tgargs: each one followed by a zero byte).
CREATE OR REPLACE FUNCTION citapulse.trigger_args(args bytea) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    found text[] := '{}';
    rest  bytea := args;
    cut   integer;
BEGIN
    LOOP
        cut := position('\x00'::bytea IN rest);
        EXIT WHEN cut = 0;
        found := found || convert_from(substring(rest FROM 1 FOR cut - 1), current_setting('server_encoding'));
        rest := substring(rest FROM cut + 1);
    END LOOP;
    RETURN found;
END
$$;

-- The watched tables (since version 6; before, the triggers' arguments were the only
-- record, and WAL mode has no trigger). saved_identity: the table's replica identity
-- before WAL mode set it to FULL, restored when it switches back or the table is unwatched.
CREATE TABLE IF NOT EXISTS citapulse.watches (
    tbl             regclass PRIMARY KEY,
    tenant_column   text NOT NULL,          -- '' = resolved by the daemon's [[resolvers]]
    kind            text NOT NULL,
    saved_identity  "char"
);
-- Version 8: the columns holding user ids an event of the table also goes to
-- (usuario:<tenant>:<value>), from the new and the old row.
ALTER TABLE citapulse.watches ADD COLUMN IF NOT EXISTS route_columns text[] NOT NULL DEFAULT '{}';
INSERT INTO citapulse.watches (tbl, tenant_column, kind)
SELECT t.tgrelid::regclass, a[1], a[2]
  FROM pg_trigger t, citapulse.trigger_args(t.tgargs) a
 WHERE t.tgname = 'citapulse_insert' AND t.tgfoid = 'citapulse.capture'::regproc
ON CONFLICT (tbl) DO NOTHING;

-- Where the WAL capture of each slot stands: the end of the last transaction the daemon
-- wrote to the log (written in that same transaction, so a daemon that dies between its
-- commit and confirming the slot skips what it already wrote), and whether the stream
-- after it is in WAL mode (capture_mode() marks each switch in the WAL itself).
CREATE TABLE IF NOT EXISTS citapulse.wal_position (
    slot        text PRIMARY KEY,
    lsn         pg_lsn      NOT NULL DEFAULT '0/0',
    capturing   boolean     NOT NULL DEFAULT false,
    mark        bigint      NOT NULL DEFAULT 0,     -- the last switch mark captured past
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION citapulse.drop_triggers(tbl regclass) RETURNS void
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

-- Makes one watched table capture the way citapulse.settings.capture says: the four
-- triggers (one per operation: transition tables allow one event each), or no trigger,
-- REPLICA IDENTITY FULL (so UPDATE and DELETE carry the whole old row) and membership of
-- the publication citapulse.
CREATE OR REPLACE FUNCTION citapulse.attach(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w         citapulse.watches;
    threshold integer;
    mode      text;
    ident     "char";
BEGIN
    SELECT * INTO w FROM citapulse.watches x WHERE x.tbl = attach.tbl;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The threshold travels as a trigger argument: reading it from a table on every
    -- write costs the app more than anything else capture() does (an UPDATE of
    -- citapulse.settings.bulk_threshold re-attaches the triggers).
    SELECT s.bulk_threshold, s.capture INTO threshold, mode FROM citapulse.settings s;
    threshold := coalesce(threshold, 100);
    PERFORM citapulse.drop_triggers(tbl);
    SELECT c.relreplident INTO ident FROM pg_class c WHERE c.oid = tbl;
    IF coalesce(mode, 'trigger') = 'wal' THEN
        IF w.saved_identity IS NULL THEN
            UPDATE citapulse.watches x SET saved_identity = ident WHERE x.tbl = attach.tbl;
        END IF;
        IF ident <> 'f' THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                        WHERE p.pubname = 'citapulse' AND r.prrelid = tbl) THEN
            EXECUTE format('ALTER PUBLICATION citapulse ADD TABLE %s', tbl);
        END IF;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                WHERE p.pubname = 'citapulse' AND r.prrelid = tbl) THEN
        EXECUTE format('ALTER PUBLICATION citapulse DROP TABLE %s', tbl);
    END IF;
    IF w.saved_identity IS NOT NULL THEN
        IF w.saved_identity <> ident THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY %s', tbl,
                           CASE w.saved_identity WHEN 'd' THEN 'DEFAULT' WHEN 'n' THEN 'NOTHING' ELSE 'FULL' END);
        END IF;
        UPDATE citapulse.watches x SET saved_identity = NULL WHERE x.tbl = attach.tbl;
    END IF;
    EXECUTE format('CREATE TRIGGER citapulse_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS citapulse_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture(%L, %L, %L)', tbl, w.tenant_column, w.kind, threshold);
    EXECUTE format('CREATE TRIGGER citapulse_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS citapulse_old NEW TABLE AS citapulse_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture(%L, %L, %L)', tbl, w.tenant_column, w.kind, threshold);
    EXECUTE format('CREATE TRIGGER citapulse_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS citapulse_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture(%L, %L, %L)', tbl, w.tenant_column, w.kind, threshold);
    EXECUTE format('CREATE TRIGGER citapulse_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture_truncate(%L)', tbl, w.kind);
END
$$;

-- The people a changed row of a table with route columns goes to: 'u:<value>' for each
-- non-NULL value of those columns (at most 4) in the new and the old row (an appointment
-- moved from professional A to B reaches both); 'u:*' (every user channel of the tenant)
-- for a calendar_refresh, which carries no row. A row value '*' is never 'u:*'; other
-- values that cannot be a channel name's user part are kept but reach nobody (channel
-- names are validated). One expression, so PostgreSQL inlines it into the move: a
-- sub-select here doubled the daemon's cost of moving a row.
CREATE OR REPLACE FUNCTION citapulse.row_routes(cols text[], new_row jsonb, old_row jsonb)
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN cols IS NULL OR cardinality(cols) = 0 THEN NULL
        WHEN new_row IS NULL AND old_row IS NULL THEN ARRAY['u:*']
        ELSE array_remove(ARRAY[
            'u:' || NULLIF(new_row ->> cols[1], '*'), 'u:' || NULLIF(old_row ->> cols[1], '*'),
            'u:' || NULLIF(new_row ->> cols[2], '*'), 'u:' || NULLIF(old_row ->> cols[2], '*'),
            'u:' || NULLIF(new_row ->> cols[3], '*'), 'u:' || NULLIF(old_row ->> cols[3], '*'),
            'u:' || NULLIF(new_row ->> cols[4], '*'), 'u:' || NULLIF(old_row ->> cols[4], '*')], NULL)
    END
$$;

-- Watches a table: records it and attaches its capture (triggers, or the publication in
-- WAL mode). Calling it again replaces them, so changing tenant_column or kind is one call.
-- tenant_column => NULL watches a table without one: the daemon resolves each row's
-- tenant with a [[resolvers]] query from its config.
-- route_columns (version 8) name the columns holding user ids: each event of the table
-- also goes to usuario:<tenant>:<value> of the new and the old row's values. NULL keeps
-- what an earlier call set (none for a new table); '{}' clears them.
-- (Version 7's three-argument watch() is replaced: re-grant watch() to DBA roles.)
DROP FUNCTION IF EXISTS citapulse.watch(regclass, text, text);
CREATE OR REPLACE FUNCTION citapulse.watch(tbl regclass, tenant_column text, kind text DEFAULT 'appointment',
                                           route_columns text[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    col text;
BEGIN
    IF kind IS NULL OR kind !~ '^[a-z][a-z0-9_]{0,40}$' THEN
        RAISE EXCEPTION 'citapulse.watch: kind must match ^[a-z][a-z0-9_]{0,40}$ (got %)', kind;
    END IF;
    IF tenant_column IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = tbl AND attname = tenant_column AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'citapulse.watch: table % has no column %', tbl, tenant_column;
    END IF;
    IF cardinality(route_columns) > 4 THEN
        RAISE EXCEPTION 'citapulse.watch: at most 4 route_columns';
    END IF;
    FOREACH col IN ARRAY coalesce(route_columns, '{}') LOOP
        IF col IS NULL OR NOT EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = tbl AND attname = col AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'citapulse.watch: table % has no column % (route_columns)', tbl, coalesce(col, 'NULL');
        END IF;
    END LOOP;
    INSERT INTO citapulse.watches AS w (tbl, tenant_column, kind, route_columns)
    VALUES (tbl, coalesce(tenant_column, ''), kind, coalesce(route_columns, '{}'))
    ON CONFLICT ON CONSTRAINT watches_pkey DO UPDATE
       SET tenant_column = excluded.tenant_column, kind = excluded.kind,
           route_columns = coalesce(watch.route_columns, w.route_columns);
    PERFORM citapulse.attach(tbl);
END
$$;

-- Stops watching a table: drops its triggers, takes it out of the publication and gives
-- it back the replica identity it had before WAL mode.
CREATE OR REPLACE FUNCTION citapulse.unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    saved "char";
BEGIN
    PERFORM citapulse.drop_triggers(tbl);
    IF EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                WHERE p.pubname = 'citapulse' AND r.prrelid = tbl) THEN
        EXECUTE format('ALTER PUBLICATION citapulse DROP TABLE %s', tbl);
    END IF;
    DELETE FROM citapulse.watches w WHERE w.tbl = unwatch.tbl RETURNING w.saved_identity INTO saved;
    IF saved IS NOT NULL AND saved <> (SELECT c.relreplident FROM pg_class c WHERE c.oid = tbl) THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY %s', tbl,
                       CASE saved WHEN 'd' THEN 'DEFAULT' WHEN 'n' THEN 'NOTHING' ELSE 'FULL' END);
    END IF;
END
$$;

-- Attaches the capture of every watched table again, with the same tenant column and
-- kind and the current settings (after an upgrade, a new bulk threshold or a mode switch).
-- Tables dropped since they were watched are forgotten.
CREATE OR REPLACE FUNCTION citapulse.rewatch_all() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t regclass;
    n integer := 0;
BEGIN
    DELETE FROM citapulse.watches w WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = w.tbl);
    -- In oid order, so two concurrent calls lock the tables in the same order.
    FOR t IN SELECT w.tbl FROM citapulse.watches w ORDER BY w.tbl::oid LOOP
        PERFORM citapulse.attach(t);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- capture_mode() is one SQL expression, which the planner inlines into the caller's
-- query, because PostgreSQL cannot create a logical slot from inside a function (PL/pgSQL
-- or a SQL function of several statements) while other sessions run DDL ("snapshot
-- reference … is not owned by resource owner TopTransaction"); from the top-level query
-- it can. Arguments are evaluated in order: checks and the lock, the slot, the switch.
CREATE OR REPLACE FUNCTION citapulse.slot_exists(name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots r WHERE r.slot_name = name)
$$;

-- The slot a switch uses: the one given, else the database's.
CREATE OR REPLACE FUNCTION citapulse.capture_slot(slot text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(slot, (SELECT s.wal_slot FROM citapulse.settings s), 'citapulse')
$$;

CREATE OR REPLACE FUNCTION citapulse.capture_prepare(mode text, slot text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    wanted   text;
    existing record;
BEGIN
    IF mode IS NULL OR mode NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'citapulse.capture_mode: mode must be ''trigger'' or ''wal'' (got %)', mode;
    END IF;
    wanted := citapulse.capture_slot(slot);
    IF wanted !~ '^[a-z0-9_]{1,63}$' THEN
        RAISE EXCEPTION 'citapulse.capture_mode: slot must match ^[a-z0-9_]{1,63}$ (got %)', wanted;
    END IF;
    -- Serialises switches with a daemon dropping a drained slot. An advisory lock takes
    -- no transaction id, so the slot can still be created next.
    PERFORM pg_advisory_xact_lock(citapulse.switch_lock_key());
    SELECT r.plugin, r.slot_type, r.database INTO existing FROM pg_replication_slots r WHERE r.slot_name = wanted;
    IF mode = 'trigger' THEN
        RETURN wanted;
    END IF;
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'citapulse.capture_mode: WAL capture needs wal_level = logical (it is %)', current_setting('wal_level')
            USING HINT = 'Run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL (a reload is not enough).';
    END IF;
    -- pgoutput reads the publication as of each change, from the slot's start on: it
    -- must exist before the slot does (install.sql creates it, empty).
    IF NOT EXISTS (SELECT 1 FROM pg_publication p WHERE p.pubname = 'citapulse') THEN
        RAISE EXCEPTION 'citapulse.capture_mode: the publication citapulse is missing'
            USING HINT = 'Run sql/install.sql again (it creates the publication), then this.';
    END IF;
    IF existing.slot_type IS NOT NULL AND (existing.slot_type <> 'logical' OR existing.plugin IS DISTINCT FROM 'pgoutput'
                                           OR existing.database IS DISTINCT FROM current_database()) THEN
        RAISE EXCEPTION 'citapulse.capture_mode: replication slot % exists but is not a pgoutput slot of this database', wanted
            USING HINT = 'Pick another name (citapulse.capture_mode(''wal'', ''<slot>'') and capture.slot in the daemon''s config) or drop that slot.';
    END IF;
    IF (SELECT s.capture FROM citapulse.settings s) = 'wal' AND wanted IS DISTINCT FROM (SELECT s.wal_slot FROM citapulse.settings s) THEN
        RAISE EXCEPTION 'citapulse.capture_mode: already capturing from slot %', (SELECT s.wal_slot FROM citapulse.settings s)
            USING HINT = 'Switch to trigger first to move to another slot.';
    END IF;
    RETURN wanted;
END
$$;

CREATE OR REPLACE FUNCTION citapulse.capture_switch(mode text, wanted text, created text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    current text;
BEGIN
    SELECT s.capture INTO current FROM citapulse.settings s FOR UPDATE;
    IF mode = 'wal' THEN
        IF created IS NOT NULL THEN
            INSERT INTO citapulse.wal_position AS p (slot, mark) VALUES (wanted, (SELECT s.switches FROM citapulse.settings s))
            ON CONFLICT ON CONSTRAINT wal_position_pkey DO UPDATE SET lsn = '0/0', capturing = false, mark = excluded.mark, updated_at = now();
            -- Already in WAL mode (the slot was dropped by hand): capture from here on.
            UPDATE citapulse.wal_position p SET capturing = true WHERE p.slot = wanted AND current = 'wal';
        END IF;
        INSERT INTO citapulse.wal_position (slot) VALUES (wanted) ON CONFLICT ON CONSTRAINT wal_position_pkey DO NOTHING;
    END IF;
    IF current = mode THEN
        PERFORM citapulse.rewatch_all();   -- repairs a publication or triggers edited by hand
        RETURN mode;
    END IF;
    UPDATE citapulse.settings s SET capture = mode, switches = s.switches + 1,
           wal_slot = CASE WHEN mode = 'wal' THEN wanted ELSE s.wal_slot END;
    PERFORM pg_logical_emit_message(true, 'citapulse', 'capture=' || mode || ' ' || s.switches)
       FROM citapulse.settings s WHERE mode = 'wal' OR current_setting('wal_level') = 'logical';
    PERFORM citapulse.rewatch_all();
    PERFORM pg_notify('citapulse_capture', '');
    RETURN mode;
END
$$;

-- Switches how changes are captured (DESIGN.md §7), losslessly in both directions:
-- every watched table is locked (ACCESS EXCLUSIVE, briefly, in oid order), so each
-- application transaction is captured either by the triggers (committed before the
-- switch) or from the WAL (after it); a message in the WAL marks the switch at exactly
-- that point of the commit order, and the daemon streaming the slot captures only what
-- lies between a 'capture=wal' and a 'capture=trigger' mark. Run it on its own (creating
-- a slot needs a transaction that has written nothing), as the owner of the watched
-- tables with REPLICATION (or as superuser). `slot` is the daemon's `capture.slot`
-- (default citapulse). Switching to 'trigger' leaves the slot to the daemon, which drops
-- it once it has captured everything up to the switch.
-- From PostgreSQL 17 on the slot is a failover slot: a standby with
-- sync_replication_slots = on keeps a copy, so capture survives a failover. The call is
-- written for the server at hand (older servers have no failover argument), which is why
-- running this script again after a major upgrade matters.
DO $do$
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION citapulse.capture_mode(mode text, slot text DEFAULT NULL) RETURNS text
LANGUAGE sql AS $$
    SELECT citapulse.capture_switch(mode, citapulse.capture_slot(slot),
           CASE WHEN citapulse.capture_prepare(mode, slot) IS NOT NULL AND mode = 'wal'
                     AND NOT citapulse.slot_exists(citapulse.capture_slot(slot))
                THEN (pg_create_logical_replication_slot(citapulse.capture_slot(slot), 'pgoutput'%s)).slot_name::text
           END)
$$ $f$,
        CASE WHEN current_setting('server_version_num')::int >= 170000
             THEN ', failover => true' ELSE '' END);
END
$do$;

-- The advisory lock key of capture_mode() and of a daemon dropping a drained slot.
CREATE OR REPLACE FUNCTION citapulse.switch_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 7382917400000001::bigint $$;

-- WAL mode's publication, empty until capture_mode('wal') adds the watched tables. It
-- exists from the install on because a slot only ever sees publications older than itself.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication p WHERE p.pubname = 'citapulse') THEN
        CREATE PUBLICATION citapulse;
    END IF;
END
$$;

-- Saves where the WAL capture stands, in the transaction in which the daemon wrote the
-- rows decoded up to there into citapulse.events (one INSERT per run of one table's
-- rows, prepared by the daemon: jsonb_populate_record() types the text values through
-- each column's input function, so row_data is exactly what to_jsonb(NEW) gives in
-- trigger mode); what is written and where to resume commit together. Wakes the readers.
CREATE OR REPLACE FUNCTION citapulse.wal_confirm(slot text, upto pg_lsn, capturing boolean, mark bigint, wake boolean)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE citapulse.wal_position p SET lsn = upto, capturing = wal_confirm.capturing, mark = wal_confirm.mark,
           updated_at = now()
     WHERE p.slot = wal_confirm.slot;
    IF wake THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
END
$$;
DROP FUNCTION IF EXISTS citapulse.wal_write(text, pg_lsn, boolean, bigint, oid[], text[], text[], jsonb[], jsonb[], text[], jsonb[]);

-- Drops a drained slot after a switch back to trigger mode: only once the daemon has
-- captured past the latest switch's mark (so everything WAL mode committed is in the
-- log) and closed its stream. The advisory lock orders it with capture_mode(): a switch
-- to 'wal' that came first leaves the slot; one that comes after creates a new slot.
CREATE OR REPLACE FUNCTION citapulse.wal_drop_slot(slot text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(citapulse.switch_lock_key());
    IF NOT EXISTS (SELECT 1 FROM citapulse.settings s, citapulse.wal_position p
                    WHERE p.slot = wal_drop_slot.slot AND s.capture = 'trigger'
                      AND NOT p.capturing AND p.mark = s.switches)
       OR EXISTS (SELECT 1 FROM pg_replication_slots r WHERE r.slot_name = wal_drop_slot.slot AND r.active) THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_replication_slots r WHERE r.slot_name = wal_drop_slot.slot) THEN
        PERFORM pg_drop_replication_slot(slot);
    END IF;
    DELETE FROM citapulse.wal_position p WHERE p.slot = wal_drop_slot.slot;
    RETURN true;
END
$$;

-- A new bulk_threshold in citapulse.settings (the daemon writes events.bulk_threshold
-- there) re-attaches the triggers, whose argument it is. As the owner: whoever may
-- update the settings row need not own the watched tables.
CREATE OR REPLACE FUNCTION citapulse.settings_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM citapulse.rewatch_all();
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS citapulse_settings_changed ON citapulse.settings;
CREATE TRIGGER citapulse_settings_changed AFTER UPDATE OF bulk_threshold ON citapulse.settings
    FOR EACH ROW WHEN (old.bulk_threshold IS DISTINCT FROM new.bulk_threshold)
    EXECUTE FUNCTION citapulse.settings_changed();

-- The watched tables, for `citapulse check` and DBAs.
CREATE OR REPLACE VIEW citapulse.watched AS
SELECT w.tbl,
       (SELECT count(*) FROM pg_trigger t
         WHERE t.tgrelid = w.tbl AND NOT t.tgisinternal
           AND t.tgfoid IN ('citapulse.capture'::regproc, 'citapulse.capture_truncate'::regproc)) AS triggers,
       (SELECT coalesce(array_agg(t.tgname::text ORDER BY t.tgname), '{}') FROM pg_trigger t
         WHERE t.tgrelid = w.tbl AND NOT t.tgisinternal
           AND t.tgfoid IN ('citapulse.capture'::regproc, 'citapulse.capture_truncate'::regproc)) AS trigger_names,
       EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                WHERE p.pubname = 'citapulse' AND r.prrelid = w.tbl) AS in_publication
  FROM citapulse.watches w;

-- Message types the daemon itself sends, and those clients send: an emitted event may
-- not pose as one of them. The same names as SERVER_MESSAGE_TYPES and
-- CLIENT_MESSAGE_TYPES in src/delivery/protocol.rs (tests/security.rs compares them).
CREATE OR REPLACE FUNCTION citapulse.reserved_event_types() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['connected', 'subscribed', 'unsubscribed', 'stats', 'error', 'pong',
                 'authenticated', 'presence', 'presence_join', 'presence_leave',
                 'subscribe', 'unsubscribe', 'ping', 'auth']
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
    INSERT INTO citapulse.inbox (tenant, kind, event_type, op, payload)
    VALUES (tenant, 'custom', event_type, 'EMIT', coalesce(data, '{}'::jsonb))
    RETURNING id INTO new_id;
    IF citapulse.notifying() THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
    RETURN new_id;
END
$$;

-- Publishes an event to one user's channel (usuario:<tenant>:<user_id>) or one role's
-- (rol:<tenant>:<role>), in the caller's transaction like emit(). It does not go to the
-- tenant's channel: only the addressed people (and super roles subscribed to their
-- channel) receive it.
CREATE OR REPLACE FUNCTION citapulse.emit_to(tenant text, route text, event_type text, data jsonb)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
BEGIN
    IF tenant IS NULL OR tenant !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'citapulse.emit_to_%: tenant must match ^[A-Za-z0-9_.-]{1,64}$ (the tenant of one channel)',
            CASE left(route, 1) WHEN 'u' THEN 'user' ELSE 'role' END;
    END IF;
    IF route IS NULL OR substr(route, 3) !~ '^[A-Za-z0-9_.@-]{1,128}$' THEN
        RAISE EXCEPTION 'citapulse.emit_to_%: % must match ^[A-Za-z0-9_.@-]{1,128}$',
            CASE left(route, 1) WHEN 'u' THEN 'user' ELSE 'role' END,
            CASE left(route, 1) WHEN 'u' THEN 'user_id' ELSE 'role' END;
    END IF;
    IF event_type IS NULL OR event_type !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,63}$' THEN
        RAISE EXCEPTION 'citapulse.emit_to_%: event_type must match ^[A-Za-z][A-Za-z0-9_.:-]{0,63}$',
            CASE left(route, 1) WHEN 'u' THEN 'user' ELSE 'role' END;
    END IF;
    IF lower(event_type) = ANY (citapulse.reserved_event_types()) THEN
        RAISE EXCEPTION 'citapulse.emit_to_%: event_type % is reserved for messages of the server',
            CASE left(route, 1) WHEN 'u' THEN 'user' ELSE 'role' END, event_type;
    END IF;
    INSERT INTO citapulse.inbox (tenant, kind, event_type, op, payload, routes)
    VALUES (tenant, 'custom', event_type, 'EMIT_TO', coalesce(data, '{}'::jsonb), ARRAY[route])
    RETURNING id INTO new_id;
    IF citapulse.notifying() THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
    RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION citapulse.emit_to_user(tenant text, user_id text, event_type text, data jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT citapulse.emit_to(tenant, 'u:' || coalesce(user_id, ''), event_type, data)
$$;

CREATE OR REPLACE FUNCTION citapulse.emit_to_role(tenant text, role text, event_type text, data jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT citapulse.emit_to(tenant, 'r:' || coalesce(role, ''), event_type, data)
$$;

-- Revoked users (DESIGN.md §8, version 7): every daemon reads the rows above the last
-- version it saw (within a second), closes the user's sockets (4003) and refuses tokens
-- issued at or before revoked_at. A lifted revocation stays as a row (revoked = false)
-- so that every instance learns of it.
CREATE SEQUENCE IF NOT EXISTS citapulse.revocation_version;
CREATE TABLE IF NOT EXISTS citapulse.revocations (
    tenant      text        NOT NULL,
    user_id     text        NOT NULL,
    revoked     boolean     NOT NULL DEFAULT true,
    revoked_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason      text,
    version     bigint      NOT NULL DEFAULT nextval('citapulse.revocation_version'),
    PRIMARY KEY (tenant, user_id)
);
CREATE INDEX IF NOT EXISTS revocations_version_idx ON citapulse.revocations (version);

-- The lock keys that order presence writes (this one) and revocations (this one + 1):
-- each writer takes it before drawing versions, so versions commit in order and a reader
-- of "version > last" skips nothing.
CREATE OR REPLACE FUNCTION citapulse.people_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 7382917400000003::bigint $$;

-- Closes every socket of `user_id` in `tenant` on every instance and refuses its tokens
-- issued until now. Transactional: takes effect when the caller commits (a DBA may call
-- it from a trigger on the application's users table when one is deactivated).
CREATE OR REPLACE FUNCTION citapulse.revoke(tenant text, user_id text, reason text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(citapulse.people_lock_key() + 1);
    IF tenant IS NULL OR tenant !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'citapulse.revoke: tenant must match ^[A-Za-z0-9_.-]{1,64}$ (the tenant of one channel)';
    END IF;
    IF user_id IS NULL OR length(user_id) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'citapulse.revoke: user_id must be 1 to 256 characters (the token''s sub)';
    END IF;
    INSERT INTO citapulse.revocations AS r (tenant, user_id, reason)
    VALUES (revoke.tenant, revoke.user_id, left(revoke.reason, 500))
    ON CONFLICT ON CONSTRAINT revocations_pkey DO UPDATE
       SET revoked = true, revoked_at = clock_timestamp(), reason = excluded.reason,
           version = nextval('citapulse.revocation_version');
END
$$;

-- Lifts a revocation: tokens of the user are accepted again (those not yet expired).
CREATE OR REPLACE FUNCTION citapulse.unrevoke(tenant text, user_id text)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(citapulse.people_lock_key() + 1);
    UPDATE citapulse.revocations r SET revoked = false, version = nextval('citapulse.revocation_version')
     WHERE r.tenant = unrevoke.tenant AND r.user_id = unrevoke.user_id AND r.revoked;
    RETURN FOUND;
END
$$;

-- Presence (DESIGN.md §8, version 8): who is online in each tenant, across every daemon
-- on the database. Each daemon writes its own users (one row per tenant and user, with
-- its number of connections; 0 = left, kept until every daemon has read it) and a
-- heartbeat; every daemon reads the rows above the last version it saw and counts only
-- daemons whose heartbeat is younger than its presence.ttl_ms. Writes take a lock, so
-- versions are handed out in commit order and a reader never skips a late commit.
CREATE TABLE IF NOT EXISTS citapulse.presence_instances (
    instance   text PRIMARY KEY,
    heartbeat  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE SEQUENCE IF NOT EXISTS citapulse.presence_version;
CREATE TABLE IF NOT EXISTS citapulse.presence (
    instance     text        NOT NULL,
    tenant       text        NOT NULL,
    user_id      text        NOT NULL,
    role         text,
    connections  integer     NOT NULL,
    since        timestamptz NOT NULL,
    version      bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (instance, tenant, user_id)
);
CREATE INDEX IF NOT EXISTS presence_version_idx ON citapulse.presence (version);


-- One daemon's heartbeat and changed users. `leaving_in_ms` (a daemon shutting down)
-- dates the heartbeat back so the others count its users for only that much longer.
-- Returns whether the daemon had been given up for dead (no heartbeat for `ttl_ms`):
-- it must then write all its users again, since the others dropped them.
CREATE OR REPLACE FUNCTION citapulse.presence_write(instance text, ttl_ms integer, tenants text[], users text[],
                                                    roles text[], connections integer[], sinces float8[],
                                                    leaving_in_ms integer DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    previous timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(citapulse.people_lock_key());
    SELECT i.heartbeat INTO previous FROM citapulse.presence_instances i WHERE i.instance = presence_write.instance;
    INSERT INTO citapulse.presence_instances AS i (instance, heartbeat)
    VALUES (presence_write.instance,
            clock_timestamp() - CASE WHEN leaving_in_ms IS NULL THEN interval '0'
                                     ELSE make_interval(secs => greatest(ttl_ms - leaving_in_ms, 0) / 1000.0) END)
    ON CONFLICT ON CONSTRAINT presence_instances_pkey DO UPDATE SET heartbeat = excluded.heartbeat;
    INSERT INTO citapulse.presence AS p (instance, tenant, user_id, role, connections, since, version)
    SELECT presence_write.instance, u.tenant, u.user_id, u.role, u.connections, to_timestamp(u.since),
           nextval('citapulse.presence_version')
      FROM unnest(tenants, users, roles, connections, sinces) AS u(tenant, user_id, role, connections, since)
    ON CONFLICT ON CONSTRAINT presence_pkey DO UPDATE
       SET role = excluded.role, connections = excluded.connections, since = excluded.since,
           version = excluded.version, updated_at = clock_timestamp();
    -- Housekeeping: leaves every daemon has long read, and daemons dead for a while.
    DELETE FROM citapulse.presence p
     WHERE p.instance = presence_write.instance AND p.connections = 0
       AND p.updated_at < clock_timestamp() - make_interval(secs => 2 * ttl_ms / 1000.0);
    DELETE FROM citapulse.presence p USING citapulse.presence_instances i
     WHERE p.instance = i.instance AND i.heartbeat < clock_timestamp() - make_interval(secs => 4 * ttl_ms / 1000.0);
    DELETE FROM citapulse.presence_instances i
     WHERE i.heartbeat < clock_timestamp() - make_interval(secs => 4 * ttl_ms / 1000.0);
    RETURN previous IS NULL OR previous < clock_timestamp() - make_interval(secs => ttl_ms / 1000.0);
END
$$;

-- Reminders (DESIGN.md §9, version 8). Nothing is added to the write path: the daemon
-- leading reminders asks each watched appointment table every few seconds for the
-- reminders falling due within a short lookahead (due_reminders: an index range on
-- fecha, a few days of appointments), keeps them in memory and fires each at its due
-- time (fire_reminder), which re-reads the row, so a reschedule or a cancellation since
-- the scan is seen. citapulse.reminders_sent makes each (row, minutes_before, start)
-- go out once, whichever daemon fires it and however often it is found. Start =
-- (fecha + hora_inicio) in the tenant's zone (citapulse.tenant_zones, which the daemon
-- fills from tenants.timezone_query; the default zone otherwise).
CREATE TABLE IF NOT EXISTS citapulse.tenant_zones (
    tenant      text PRIMARY KEY,
    zone        text NOT NULL,
    checked_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS citapulse.reminders_sent (
    tbl             text        NOT NULL,
    row_id          text        NOT NULL,
    minutes_before  integer     NOT NULL,
    starts_at       timestamptz NOT NULL,
    sent_at         timestamptz NOT NULL DEFAULT now(),
    late            boolean     NOT NULL DEFAULT false,   -- more than catch_up overdue: not sent, counted
    PRIMARY KEY (tbl, row_id, minutes_before, starts_at)
);

-- The columns reminders need, or a message naming what is missing.
CREATE OR REPLACE FUNCTION citapulse.reminder_table_problem(tbl regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN missing = '{}' THEN NULL
                ELSE format('%s has no column %s: no reminders for it', tbl, array_to_string(missing, ', ')) END
      FROM (SELECT ARRAY(SELECT c FROM unnest(ARRAY['id', 'fecha', 'hora_inicio', 'estado']) c
                          WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                                             WHERE a.attrelid = tbl AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped))
                   AS missing) m
$$;

-- How a table is watched, if it is an appointment table reminders can read (NULL fields
-- otherwise).
CREATE OR REPLACE FUNCTION citapulse.reminder_watch(tbl regclass) RETURNS citapulse.watches
LANGUAGE sql STABLE AS $$
    SELECT x.* FROM citapulse.watches x
     WHERE x.tbl = reminder_watch.tbl AND x.kind = 'appointment' AND x.tenant_column <> ''
       AND citapulse.reminder_table_problem(reminder_watch.tbl) IS NULL
$$;

-- The reminders of one watched appointment table that fall due from `since` until
-- `until` (those due before now() - catch_up are `late`), not sent yet, earliest first,
-- at most `lim` (version 9: a busy day is read in pages, never whole). One query on the
-- table, bounded by fecha (the window's UTC dates ± 1 day cover every zone, -12 to +14
-- hours: an index on fecha keeps the scan to those days' appointments).
DROP FUNCTION IF EXISTS citapulse.due_reminders(regclass, integer[], text[], text, timestamptz, timestamptz, double precision);
CREATE OR REPLACE FUNCTION citapulse.due_reminders(tbl regclass, minutes integer[], states text[], default_zone text,
                                                   since timestamptz, until timestamptz, catch_up_secs double precision,
                                                   lim integer DEFAULT NULL)
RETURNS TABLE (tenant text, row_id text, minutes_before integer, starts_at timestamptz, due_at timestamptz,
               zone text, late boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w citapulse.watches;
BEGIN
    w := citapulse.reminder_watch(tbl);
    IF w.tbl IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT t.%1$I::text, t.id::text, m.m, s.start, s.start - make_interval(mins => m.m), z.zone, '
        '       s.start - make_interval(mins => m.m) < now() - make_interval(secs => $7) '
        '  FROM %2$s t '
        '  CROSS JOIN unnest($1::integer[]) m(m) '
        '  LEFT JOIN citapulse.tenant_zones tz ON tz.tenant = t.%1$I::text '
        '  CROSS JOIN LATERAL (SELECT coalesce(tz.zone, $3) AS zone) z '
        '  CROSS JOIN LATERAL (SELECT (t.fecha + t.hora_inicio) AT TIME ZONE z.zone AS start) s '
        ' WHERE t.fecha BETWEEN ($4 AT TIME ZONE ''UTC'')::date - 1 '
        '                   AND (($5 + make_interval(mins => (SELECT max(x) FROM unnest($1::integer[]) x))) AT TIME ZONE ''UTC'')::date + 1 '
        '   AND t.hora_inicio IS NOT NULL AND t.estado::text = ANY ($2) '
        '   AND s.start - make_interval(mins => m.m) > $4 AND s.start - make_interval(mins => m.m) <= $5 '
        '   AND NOT EXISTS (SELECT 1 FROM citapulse.reminders_sent r WHERE r.tbl = $6 AND r.row_id = t.id::text '
        '                    AND r.minutes_before = m.m AND r.starts_at = s.start) '
        -- Earliest first; reminders due at the same instant alternate between tenants, so
        -- a page boundary never puts one tenant's thousands before another's one.
        ' ORDER BY 5, row_number() OVER (PARTITION BY t.%1$I, s.start - make_interval(mins => m.m) ORDER BY t.id), 1 '
        ' LIMIT $8',
        w.tenant_column, tbl)
    USING minutes, states, default_zone, since, until, tbl::text, catch_up_secs, lim;
END
$$;

-- Records as late, without sending them, up to `lim` reminders that fell due from
-- `since` until catch_up before now and were never sent (no daemon ran then); answers
-- how many. In the database, in pages: a start over a busy day holds none in memory.
CREATE OR REPLACE FUNCTION citapulse.record_late_reminders(tbl regclass, minutes integer[], states text[], default_zone text,
                                                           since timestamptz, catch_up_secs double precision, lim integer)
RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH late AS (
        INSERT INTO citapulse.reminders_sent AS s (tbl, row_id, minutes_before, starts_at, late)
        SELECT record_late_reminders.tbl::text, d.row_id, d.minutes_before, d.starts_at, true
          FROM citapulse.due_reminders(record_late_reminders.tbl, minutes, states, default_zone, since,
                                       now() - make_interval(secs => catch_up_secs), catch_up_secs, lim) d
        ON CONFLICT ON CONSTRAINT reminders_sent_pkey DO NOTHING
        RETURNING 1
    )
    SELECT count(*) FROM late
$$;

-- Tenants with appointments in the days around now whose zone is unknown or older than
-- `max_age_secs`: the daemon resolves them before their reminders can fall due.
CREATE OR REPLACE FUNCTION citapulse.unzoned_tenants(tbl regclass, max_age_secs double precision, lim integer DEFAULT 500)
RETURNS SETOF text LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w citapulse.watches;
BEGIN
    w := citapulse.reminder_watch(tbl);
    IF w.tbl IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT DISTINCT t.%1$I::text FROM %2$s t '
        ' WHERE t.fecha BETWEEN current_date - 2 AND current_date + 9 AND t.%1$I IS NOT NULL '
        '   AND NOT EXISTS (SELECT 1 FROM citapulse.tenant_zones z WHERE z.tenant = t.%1$I::text '
        '                    AND z.checked_at > now() - make_interval(secs => $1)) LIMIT $2',
        w.tenant_column, tbl)
    USING max_age_secs, lim;
END
$$;

-- A tenant's zone as the daemon resolved it.
CREATE OR REPLACE FUNCTION citapulse.set_tenant_zone(tenant text, zone text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO citapulse.tenant_zones AS z (tenant, zone) VALUES (set_tenant_zone.tenant, set_tenant_zone.zone)
    ON CONFLICT ON CONSTRAINT tenant_zones_pkey DO UPDATE SET zone = excluded.zone, checked_at = now()
$$;

-- An instant as RFC 3339 with the offset of a zone, e.g. 2026-12-03T09:30:00-05:00.
CREATE OR REPLACE FUNCTION citapulse.rfc3339(t timestamptz, zone text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(t AT TIME ZONE zone, 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN o < interval '0' THEN '-' ELSE '+' END
        || to_char(abs(extract(epoch FROM o))::integer / 3600, 'FM00') || ':'
        || to_char(abs(extract(epoch FROM o))::integer % 3600 / 60, 'FM00')
      FROM (SELECT (t AT TIME ZONE zone) - (t AT TIME ZONE 'UTC') AS o) x
$$;

-- Fires a batch of reminders found by due_reminders(), in one statement (version 9; a
-- round trip each held 20 000 due together for seconds): re-reads each row (still
-- there, in a reminder state, starting when it did), records it in reminders_sent and,
-- unless it is `late`, writes a cita_reminder event to the inbox (routed like the row),
-- in the batch's order. Answers how many were sent, recorded late (too overdue: not
-- sent), and stale (the row changed, or another call already recorded it).
DROP FUNCTION IF EXISTS citapulse.fire_reminder(regclass, text, integer, timestamptz, text, text[], boolean);
CREATE OR REPLACE FUNCTION citapulse.fire_reminders(tbl regclass, row_ids text[], minutes integer[], starts timestamptz[],
                                                    zones text[], states text[], late boolean[],
                                                    OUT sent bigint, OUT recorded_late bigint, OUT stale bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w          citapulse.watches;
    idtype     text;
    qualified  text;
BEGIN
    sent := 0;
    recorded_late := 0;
    stale := coalesce(cardinality(row_ids), 0);
    SELECT * INTO w FROM citapulse.watches x WHERE x.tbl = fire_reminders.tbl AND x.kind = 'appointment';
    IF NOT FOUND OR stale = 0 THEN
        RETURN;
    END IF;
    -- Compared in the id column's own type, so its index finds the row.
    SELECT format_type(a.atttypid, a.atttypmod) INTO idtype
      FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = 'id' AND NOT a.attisdropped;
    SELECT format('%I.%I', n.nspname, c.relname) INTO qualified
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    EXECUTE format($q$
        WITH current AS MATERIALIZED (
            SELECT u.i, u.row_id, u.m, u.start, u.zone, u.late, to_jsonb(t.*) AS r
              FROM unnest($1::text[], $2::integer[], $3::timestamptz[], $4::text[], $5::boolean[])
                   WITH ORDINALITY AS u(row_id, m, start, zone, late, i)
              JOIN %1$s t ON t.id = u.row_id::%2$s
             WHERE t.estado::text = ANY ($6)
               AND (t.fecha + t.hora_inicio) AT TIME ZONE u.zone = u.start
        ), recorded AS (
            INSERT INTO citapulse.reminders_sent AS s (tbl, row_id, minutes_before, starts_at, late)
            SELECT $7, c.row_id, c.m, c.start, c.late FROM current c ORDER BY c.i
            ON CONFLICT ON CONSTRAINT reminders_sent_pkey DO NOTHING
            RETURNING s.row_id, s.minutes_before, s.starts_at, s.late
        ), written AS (
            INSERT INTO citapulse.inbox (tenant, kind, event_type, tbl, op, row_data, payload)
            SELECT c.r ->> $8, 'appointment', 'cita_reminder', $9, 'REMINDER', c.r,
                   jsonb_build_object('minutes_before', c.m, 'starts_at', citapulse.rfc3339(c.start, c.zone), 'row', c.r)
              FROM current c
              JOIN recorded d ON d.row_id = c.row_id AND d.minutes_before = c.m AND d.starts_at = c.start
             WHERE NOT c.late
             ORDER BY c.i
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM recorded d WHERE d.late),
               (SELECT count(*) FROM recorded)
    $q$, qualified, idtype)
    INTO sent, recorded_late, stale
    USING row_ids, minutes, starts, zones, late, states, tbl::text, w.tenant_column, qualified;
    stale := cardinality(row_ids) - stale;
    IF sent > 0 AND citapulse.notifying() THEN
        PERFORM pg_notify('citapulse', '');
    END IF;
END
$$;

-- Forgets reminders of appointments that started long ago (called by the leader).
CREATE OR REPLACE FUNCTION citapulse.prune_reminders_sent() RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (DELETE FROM citapulse.reminders_sent s WHERE s.starts_at < now() - interval '2 days' RETURNING 1)
    SELECT count(*) FROM gone
$$;

-- Moves the inbox rows `ids` to citapulse.events with their ids, and returns the rows as
-- written (xid and horizon are the caller's transaction). The daemon's reader picks the
-- ids (committed rows, oldest first) in its read statement's snapshot and calls this in
-- the same statement (version 5): the moved rows go to subscribers from this result,
-- with no second statement to read them back. An id that is gone was moved by another
-- daemon, after that snapshot: the reader, seeing fewer rows than it asked for, reads
-- again once that move committed. Two movers delete rows in id order and the second
-- waits on the first's row locks (no deadlock), then finds them gone. No FOR UPDATE:
-- locking first would write every row twice more (lock, then delete). The daemon runs
-- it with synchronous_commit off: a move lost in a crash leaves its rows in the inbox,
-- and they move again with the same ids.
CREATE OR REPLACE FUNCTION citapulse.take_inbox(ids bigint[])
RETURNS SETOF citapulse.events
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $$
BEGIN
    -- PL/pgSQL keeps this statement's plan for the session (a SQL function would plan it
    -- on every call, several times what an empty move costs). The generic one: a custom
    -- plan asks the inbox key for its actual bounds, walking every dead entry the moves
    -- left (0.2 ms of a 0.3 ms read here); and no sequential scan, which the generic plan
    -- of a table that is nearly always empty would pick, however many dead rows it holds.
    -- (What must be scanned whole, the few rows of citapulse.watches, then costs like
    -- a disabled plan: jit off, or every move would compile it for hundreds of ms.)
    -- Rows whose tenant is over 255 bytes (see capture(): the inbox has no tenant index,
    -- so the app's write never checks) are dropped here and counted by `dropped`.
    -- Routes (version 8) are computed here, off the app's commit path, from the tables'
    -- route_columns as they are now.
    RETURN QUERY
    WITH moved AS (
        DELETE FROM citapulse.inbox i
         WHERE i.id = ANY (ids)
        RETURNING i.id, i.tenant, i.kind, i.event_type, i.tbl, i.op, i.row_data, i.old_data, i.payload, i.created_at, i.routes
    ), routing AS (
        -- regclass prints as format('%I.%I', schema, name) under this search_path (what
        -- the triggers write as tbl), from the catalog cache: no scan of pg_class.
        SELECT w.tbl::text AS tbl, w.route_columns FROM citapulse.watches w WHERE cardinality(w.route_columns) > 0
    ), written AS (
        INSERT INTO citapulse.events AS ev (id, tenant, kind, event_type, tbl, op, row_data, old_data, payload, created_at, routes)
        SELECT m.id, m.tenant, m.kind, m.event_type, m.tbl, m.op, m.row_data, m.old_data, m.payload, m.created_at,
               CASE WHEN m.op = 'EMIT_TO' THEN m.routes ELSE citapulse.row_routes(r.route_columns, m.row_data, m.old_data) END
          FROM moved m LEFT JOIN routing r ON r.tbl = m.tbl
         WHERE m.tenant IS NULL OR octet_length(m.tenant) <= 255
         ORDER BY m.id
        RETURNING ev.*
    ), dropped AS (
        SELECT count(citapulse.count_oversized_tenant()) AS n
          FROM moved m WHERE octet_length(m.tenant) > 255
    )
    SELECT w.* FROM written w, dropped d;
END
$$;

-- Moves up to `batch` committed inbox rows, oldest first, like take_inbox(), and returns
-- how many it moved (version 4's interface; tests and scripts that need the log filled
-- call it). = ANY(ARRAY(...)): probes of the key, never a join that reads the whole
-- inbox (dead rows included) to build a hash table.
CREATE OR REPLACE FUNCTION citapulse.move_inbox(batch integer DEFAULT 5000) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(*)::integer
      FROM citapulse.take_inbox(ARRAY(SELECT j.id FROM citapulse.inbox j ORDER BY j.id LIMIT batch))
$$;

-- After a restore. A logical dump (pg_dump) carries the log's xid and horizon values, which
-- are transaction ids of the cluster it was taken from: restored into a cluster whose
-- transaction counter is lower, they lie in its future. The reader would then take rows
-- for transactions that are still to come (they would come again as late commits once
-- the counter reaches them), a resume from an event written after the restore would
-- replay every restored row below it, and the shared statistics restored with the dump
-- (citapulse.stats, snapshots of the old cluster) would pass for fresh. This maps every
-- xid and horizon at or above the oldest transaction still running here to a value below
-- it, keeping their order (several old values share one new value when there are more
-- distinct old values than room below: a resume may then get a few events again, which
-- it drops by id, and never fewer), and empties citapulse.stats, a cache. Nothing to map
-- after a physical restore, a pg_upgrade, or a dump restored into a cluster that is
-- further on. `skip_ids` > 0: new event ids start that far above every id in the
-- restored log and inbox, and a resume from any id below them answers history_expired
-- (for a backup older than what clients have seen: their ids may name events that
-- were lost, and the restored sequence would hand the same ids to new events). Run it
-- before the daemons start (they refuse to run while the log has ids in the future).
CREATE OR REPLACE FUNCTION citapulse.after_restore(skip_ids bigint DEFAULT 0)
RETURNS TABLE (remapped bigint, stats_cleared bigint, next_id bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    oldest xid8;
    below numeric;
    first_id bigint;
BEGIN
    IF skip_ids < 0 THEN
        RAISE EXCEPTION 'citapulse.after_restore: skip_ids must not be negative';
    END IF;
    -- A running reader holds its place in the log by xids: remapping under it would hide
    -- rows from its late-commit rule. The daemons' reader and WAL stream name themselves.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                WHERE a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid()
                  AND a.application_name IN ('citapulse-listener', 'citapulse-wal')) THEN
        RAISE EXCEPTION 'citapulse.after_restore: citapulse daemons are connected to this database'
            USING HINT = 'Stop every daemon first (pg_stat_activity shows them as citapulse-listener and citapulse-wal), then run it again.';
    END IF;
    -- Serializes with a second call (and a daemon started meanwhile): the log holds still,
    -- and the snapshot below is taken once nothing else can move rows in.
    LOCK TABLE citapulse.events IN SHARE ROW EXCLUSIVE MODE;
    oldest := pg_snapshot_xmin(pg_current_snapshot());
    below := oldest::text::numeric;
    remapped := 0;
    -- Only a log with ids this cluster has not reached (what the daemons refuse to run
    -- on); one merely above the xmin of a long transaction is left as it is.
    -- A row's horizon is never above its xid (the xmin of the snapshot of its own transaction).
    IF EXISTS (SELECT 1 FROM citapulse.events e WHERE e.xid >= pg_snapshot_xmax(pg_current_snapshot())) THEN
        -- Values 3 .. below - 1 (0-2 are not transaction ids); dense ranks spread over them.
        WITH vals AS (
            SELECT u.x, dense_rank() OVER (ORDER BY u.x) - 1 AS r
              FROM (SELECT e.xid AS x FROM citapulse.events e UNION SELECT e.horizon FROM citapulse.events e) u
        ), n AS (SELECT count(*) AS d FROM vals), mapped AS (
            SELECT v.x, (3 + floor(v.r * (below - 3) / n.d))::text::xid8 AS y FROM vals v, n
        ), changed AS (
            UPDATE citapulse.events e SET xid = mx.y, horizon = mh.y
              FROM mapped mx, mapped mh
             WHERE mx.x = e.xid AND mh.x = e.horizon AND (e.xid <> mx.y OR e.horizon <> mh.y)
            RETURNING 1
        )
        SELECT count(*) INTO remapped FROM changed;
    END IF;
    WITH gone AS (DELETE FROM citapulse.stats RETURNING 1) SELECT count(*) INTO stats_cleared FROM gone;
    SELECT s.last_value + CASE WHEN s.is_called THEN 1 ELSE 0 END INTO first_id FROM citapulse.events_id_seq s;
    IF skip_ids > 0 THEN
        first_id := greatest(first_id, (SELECT max(e.id) + 1 FROM citapulse.events e),
                             (SELECT max(i.id) + 1 FROM citapulse.inbox i)) + skip_ids;
        PERFORM setval('citapulse.events_id_seq', first_id, false);
        UPDATE citapulse.settings SET pruned_upto = greatest(pruned_upto, first_id);
    END IF;
    next_id := first_id;
    RETURN NEXT;
END
$$;

-- Nothing for PUBLIC: a login that may create a table (a temporary one will do) must not
-- be able to attach capture() and forge events for any tenant, nor emit without a grant.
-- CREATE TRIGGER needs EXECUTE on the trigger function; firing does not, so application
-- writes need no grant. Grant watch/unwatch (and capture, capture_truncate) to DBA roles,
-- emit to applications that publish events.
-- Upgrades triggers attached before version 4 (their arguments changed in version 3, the
-- inbox came in version 4). Later versions keep the triggers as they are (capture() is
-- replaced in place), so running this script again, or upgrading a newer install, takes
-- no lock on the watched tables and never waits for the application's transactions.
DO $$
BEGIN
    IF pg_catalog.current_setting('citapulse.upgrading_from')::integer < 4 THEN
        PERFORM citapulse.rewatch_all();
    END IF;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA citapulse FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA citapulse FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA citapulse FROM PUBLIC;

COMMIT;
