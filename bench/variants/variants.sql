-- Write-path variants measured side by side for issue 17 (bench/variants/run.sh loads this
-- after sql/install.sql and sql/example_schema.sql). Each *_citas table is a copy of citas
-- with one capture design; see BENCHMARKS.md, issue 17.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
UPDATE citapulse.wakeup SET notify = false;
-- log copies
CREATE TABLE ev_full (LIKE citapulse.events INCLUDING ALL);
CREATE TABLE ev_full2 (LIKE citapulse.events INCLUDING ALL);
CREATE TABLE ev_pk (LIKE citapulse.events INCLUDING DEFAULTS); ALTER TABLE ev_pk ADD PRIMARY KEY (id);
CREATE TABLE ev_pk2 (LIKE citapulse.events INCLUDING DEFAULTS); ALTER TABLE ev_pk2 ADD PRIMARY KEY (id);
CREATE TABLE ev_min (id bigserial primary key, tenant text, tbl text, op text, row_data jsonb, old_data jsonb, xid xid8 default pg_current_xact_id());
CREATE TABLE lean_log (id bigserial primary key, tenant text, row_data jsonb, xid xid8 default pg_current_xact_id());
CREATE TABLE plain_citas (LIKE citas INCLUDING ALL);
CREATE TABLE lean_citas (LIKE citas INCLUDING ALL);
CREATE TABLE nocount_citas (LIKE citas INCLUDING ALL);
CREATE TABLE notype_citas (LIKE citas INCLUDING ALL);
CREATE TABLE noidx_citas (LIKE citas INCLUDING ALL);
CREATE TABLE min_citas (LIKE citas INCLUDING ALL);
CREATE TABLE rowmin_citas (LIKE citas INCLUDING ALL);
CREATE FUNCTION lean_cap() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  INSERT INTO lean_log (tenant, row_data) SELECT n.negocio_id, to_jsonb(n) FROM new_rows n; RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON lean_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION lean_cap();
-- capture without the count/singletons read
CREATE FUNCTION nocount_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE tenant_col text := TG_ARGV[0]; fam text := TG_ARGV[1]; tname text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
BEGIN
  INSERT INTO ev_full (tenant, kind, event_type, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, citapulse.event_type(fam, 'INSERT', c.r, NULL), tname, 'INSERT', c.r,
         (SELECT pg_current_xact_id()), (SELECT pg_snapshot_xmin(pg_current_snapshot()))
    FROM (SELECT j.r, j.r ->> tenant_col AS tenant FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j) c
   WHERE CASE WHEN c.tenant IS NULL THEN false WHEN octet_length(c.tenant) <= 255 THEN true ELSE citapulse.count_oversized_tenant() END;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON nocount_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION nocount_cap('negocio_id','appointment');
-- and without event_type, kind, horizon (daemon-side), still all indexes
CREATE FUNCTION notype_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE tenant_col text := TG_ARGV[0]; tname text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
BEGIN
  INSERT INTO ev_full2 (tenant, kind, event_type, tbl, op, row_data)
  SELECT c.tenant, '', '', tname, 'INSERT', c.r
    FROM (SELECT j.r, j.r ->> tenant_col AS tenant FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j) c
   WHERE c.tenant IS NOT NULL;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON notype_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION notype_cap('negocio_id','appointment');
-- same, only the PK on the log
CREATE FUNCTION noidx_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE tenant_col text := TG_ARGV[0]; tname text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
BEGIN
  INSERT INTO ev_pk (tenant, kind, event_type, tbl, op, row_data)
  SELECT c.tenant, '', '', tname, 'INSERT', c.r
    FROM (SELECT j.r, j.r ->> tenant_col AS tenant FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j) c
   WHERE c.tenant IS NOT NULL;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON noidx_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION noidx_cap('negocio_id','appointment');
-- minimal columns, no definer
CREATE FUNCTION min_cap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ev_min (tenant, tbl, op, row_data)
  SELECT j.r ->> TG_ARGV[0], TG_TABLE_NAME, 'I', j.r FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON min_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION min_cap('negocio_id');
-- row-level, minimal
CREATE FUNCTION rowmin_cap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ev_min (tenant, tbl, op, row_data) VALUES (NEW.negocio_id, TG_TABLE_NAME, 'I', to_jsonb(NEW));
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON rowmin_citas FOR EACH ROW EXECUTE FUNCTION rowmin_cap();
SET client_min_messages = warning;
CREATE TABLE ev_a (id bigserial primary key, tenant text, tbl text, op text, row_data jsonb, old_data jsonb, xid xid8 default pg_current_xact_id());
CREATE TABLE ev_b (LIKE ev_a INCLUDING ALL);
CREATE TABLE ev_c (LIKE ev_a INCLUDING ALL);
CREATE TABLE ev_d (LIKE ev_a INCLUDING ALL, horizon xid8);
CREATE TABLE ev_e (LIKE ev_a INCLUDING ALL); CREATE INDEX ON ev_e (tenant, id); CREATE INDEX ON ev_e (xid);
CREATE TABLE ev_f (LIKE ev_a INCLUDING ALL, kind text, event_type text, created_at timestamptz default clock_timestamp());
CREATE TABLE sd_citas (LIKE citas INCLUDING ALL);
CREATE TABLE sd2_citas (LIKE citas INCLUDING ALL);
CREATE TABLE h_citas (LIKE citas INCLUDING ALL);
CREATE TABLE ix_citas (LIKE citas INCLUDING ALL);
CREATE TABLE cols_citas (LIKE citas INCLUDING ALL);
CREATE FUNCTION sd_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO public.ev_a (tenant, tbl, op, row_data)
  SELECT j.r ->> TG_ARGV[0], TG_TABLE_NAME, 'I', j.r FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON sd_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sd_cap('negocio_id');
CREATE FUNCTION sd2_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  INSERT INTO public.ev_b (tenant, tbl, op, row_data)
  SELECT j.r OPERATOR(pg_catalog.->>) TG_ARGV[0], TG_TABLE_NAME, 'I', j.r FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON sd2_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sd2_cap('negocio_id');
CREATE FUNCTION h_cap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ev_d (tenant, tbl, op, row_data, horizon)
  SELECT j.r ->> TG_ARGV[0], TG_TABLE_NAME, 'I', j.r, (SELECT pg_snapshot_xmin(pg_current_snapshot())) FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON h_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION h_cap('negocio_id');
CREATE FUNCTION ix_cap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ev_e (tenant, tbl, op, row_data)
  SELECT j.r ->> TG_ARGV[0], TG_TABLE_NAME, 'I', j.r FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON ix_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ix_cap('negocio_id');
CREATE FUNCTION cols_cap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ev_f (tenant, tbl, op, row_data, kind, event_type)
  SELECT j.r ->> TG_ARGV[0], format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), 'INSERT', j.r, TG_ARGV[1], citapulse.event_type(TG_ARGV[1], 'INSERT', j.r, NULL) FROM (SELECT to_jsonb(n.*) AS r FROM new_rows n OFFSET 0) j;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON cols_citas REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cols_cap('negocio_id', 'appointment');
SET client_min_messages = warning;
DROP TABLE IF EXISTS c1_citas, c2_citas, ev_c1, ev_c2 CASCADE;
CREATE TABLE ev_c1 (LIKE citapulse.events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE ev_c1 ADD PRIMARY KEY (id); ALTER TABLE ev_c1 ALTER COLUMN event_type DROP NOT NULL;
CREATE INDEX ON ev_c1 (tenant, id);
CREATE INDEX ON ev_c1 (xid);
CREATE INDEX ON ev_c1 USING brin (created_at) WITH (pages_per_range = 16, autosummarize = on);
CREATE TABLE ev_c2 (LIKE ev_c1 INCLUDING ALL);
CREATE TABLE c1_citas (LIKE citas INCLUDING ALL);
CREATE TABLE c2_citas (LIKE citas INCLUDING ALL);
CREATE OR REPLACE FUNCTION public.wake() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_catalog.pg_notify('citapulse', ''); RETURN true; END $$;
CREATE OR REPLACE FUNCTION c1_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1];
BEGIN
  INSERT INTO public.ev_c1 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) (SELECT s.bulk_threshold FROM citapulse.settings s)
     AND CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END
     AND CASE WHEN (SELECT w.notify FROM citapulse.wakeup w) THEN public.wake() ELSE true END;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c1_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c1_cap('negocio_id','appointment');
-- c2: no settings/wakeup reads at all (what they cost)
CREATE OR REPLACE FUNCTION c2_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1];
BEGIN
  INSERT INTO public.ev_c2 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c2_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c2_cap('negocio_id','appointment');
SET client_min_messages = warning;
DROP TABLE IF EXISTS c3_citas, ev_c3, c4_citas, ev_c4 CASCADE;
CREATE TABLE ev_c3 (LIKE ev_c1 INCLUDING ALL);
CREATE TABLE c3_citas (LIKE citas INCLUDING ALL);
CREATE TABLE ev_c4 (LIKE ev_c1 INCLUDING DEFAULTS); ALTER TABLE ev_c4 ADD PRIMARY KEY (id);
CREATE TABLE c4_citas (LIKE citas INCLUDING ALL);
CREATE OR REPLACE FUNCTION c3_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1];
  threshold pg_catalog.int4; notifying pg_catalog.bool; total pg_catalog.int8;
BEGIN
  IF COALESCE(pg_catalog.current_setting('citapulse.cached_until', true), '') OPERATOR(pg_catalog.=) ''
     OR pg_catalog.current_setting('citapulse.cached_until', true)::pg_catalog.timestamptz OPERATOR(pg_catalog.<) pg_catalog.now() THEN
    SELECT s.bulk_threshold, w.notify INTO threshold, notifying FROM citapulse.settings s, citapulse.wakeup w;
    PERFORM pg_catalog.set_config('citapulse.bulk_threshold', threshold::pg_catalog.text, false),
            pg_catalog.set_config('citapulse.notify', notifying::pg_catalog.text, false),
            pg_catalog.set_config('citapulse.cached_until', (pg_catalog.now() OPERATOR(pg_catalog.+) '100 ms'::pg_catalog.interval)::pg_catalog.text, false);
  ELSE
    threshold := pg_catalog.current_setting('citapulse.bulk_threshold');
    notifying := pg_catalog.current_setting('citapulse.notify');
  END IF;
  INSERT INTO public.ev_c3 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) threshold
     AND CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END;
  IF FOUND AND notifying THEN PERFORM pg_catalog.pg_notify('citapulse', ''); END IF;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c3_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c3_cap('negocio_id','appointment');
CREATE OR REPLACE FUNCTION c4_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1];
BEGIN
  INSERT INTO public.ev_c4 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c4_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c4_cap('negocio_id','appointment');
SET client_min_messages = warning;
DROP TABLE IF EXISTS c5_citas, c6_citas, c7_citas, ev_c5, ev_c6, ev_c7 CASCADE;
CREATE TABLE ev_c5 (LIKE ev_c1 INCLUDING ALL);
CREATE TABLE ev_c6 (LIKE ev_c1 INCLUDING ALL);
CREATE TABLE ev_c7 (LIKE ev_c1 INCLUDING ALL);
CREATE TABLE c5_citas (LIKE citas INCLUDING ALL);
CREATE TABLE c6_citas (LIKE citas INCLUDING ALL);
CREATE TABLE c7_citas (LIKE citas INCLUDING ALL);
CREATE OR REPLACE FUNCTION c5_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1];
  threshold pg_catalog.int4; notifying pg_catalog.bool; total pg_catalog.int8;
BEGIN
  SELECT (SELECT pg_catalog.count(*) FROM citapulse_new), s.bulk_threshold, w.notify INTO total, threshold, notifying FROM citapulse.settings s, citapulse.wakeup w;
  INSERT INTO public.ev_c5 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END;
  IF FOUND AND notifying THEN PERFORM pg_catalog.pg_notify('citapulse', ''); END IF;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c5_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c5_cap('negocio_id','appointment');
CREATE OR REPLACE FUNCTION c6_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1]; threshold pg_catalog.int4 := TG_ARGV[2];
  notifying pg_catalog.bool;
BEGIN
  SELECT w.notify INTO notifying FROM citapulse.wakeup w;
  INSERT INTO public.ev_c6 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) threshold
     AND CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END;
  IF FOUND AND notifying THEN PERFORM pg_catalog.pg_notify('citapulse', ''); END IF;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c6_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c6_cap('negocio_id','appointment', '100');
CREATE OR REPLACE FUNCTION c7_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1]; threshold pg_catalog.int4 := TG_ARGV[2];
BEGIN
  INSERT INTO public.ev_c7 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) threshold
     AND CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END
     AND CASE WHEN (SELECT w.notify FROM citapulse.wakeup w) THEN public.wake() ELSE true END;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c7_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c7_cap('negocio_id','appointment', '100');
SET client_min_messages = warning;
DROP TABLE IF EXISTS c8_citas, ev_c8 CASCADE;
CREATE TABLE ev_c8 (LIKE ev_c1 INCLUDING ALL);
CREATE TABLE c8_citas (LIKE citas INCLUDING ALL);
CREATE OR REPLACE FUNCTION c8_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1]; threshold pg_catalog.int4 := TG_ARGV[2];
BEGIN
  INSERT INTO public.ev_c8 (tenant, kind, tbl, op, row_data, xid, horizon)
  SELECT c.tenant, fam, TG_TABLE_NAME, 'INSERT', c.r, (SELECT pg_catalog.pg_current_xact_id()), (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()))
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) threshold
     AND CASE WHEN c.tenant IS NULL THEN false WHEN pg_catalog.octet_length(c.tenant) OPERATOR(pg_catalog.<=) 255 THEN true ELSE citapulse.count_oversized_tenant() END;
  IF FOUND AND pg_catalog.pg_try_advisory_lock_shared(1129270369, 1) THEN
    PERFORM pg_catalog.pg_advisory_unlock_shared(1129270369, 1);
    PERFORM pg_catalog.pg_notify('citapulse', '');
  END IF;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON c8_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION c8_cap('negocio_id','appointment', '100');
SET client_min_messages = warning;
DROP TABLE IF EXISTS v3_citas, v3t_citas, ev_v3, ev_v3t;
CREATE TABLE ev_v3 (LIKE citapulse.events INCLUDING ALL);
ALTER TABLE ev_v3 ALTER COLUMN event_type DROP NOT NULL;
CREATE TABLE ev_v3t (LIKE citapulse.events INCLUDING ALL);
CREATE TABLE v3_citas (LIKE citas INCLUDING ALL);
CREATE TABLE v3t_citas (LIKE citas INCLUDING ALL);
CREATE OR REPLACE FUNCTION v3_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE dummy bigint; tenant_col text := TG_ARGV[0]; fam text := TG_ARGV[1]; tname text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
BEGIN
  WITH j AS (SELECT to_jsonb(n.*) AS r, count(*) OVER () AS total FROM citapulse_new n),
       ins AS (
         INSERT INTO ev_v3 (tenant, kind, tbl, op, row_data, xid, horizon)
         SELECT c.tenant, fam, tname, 'INSERT', c.r, (SELECT pg_current_xact_id()), (SELECT pg_snapshot_xmin(pg_current_snapshot()))
           FROM (SELECT j.r, j.r ->> tenant_col AS tenant, j.total FROM j) c
          WHERE c.total <= (SELECT s.bulk_threshold FROM citapulse.settings s)
            AND CASE WHEN c.tenant IS NULL THEN false WHEN octet_length(c.tenant) <= 255 THEN true ELSE citapulse.count_oversized_tenant() END
         RETURNING 1)
  SELECT count(pg_notify('citapulse', '')) INTO dummy FROM citapulse.wakeup w WHERE w.notify AND EXISTS (SELECT 1 FROM ins);
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON v3_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION v3_cap('negocio_id','appointment');
CREATE OR REPLACE FUNCTION v3t_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE dummy bigint; tenant_col text := TG_ARGV[0]; fam text := TG_ARGV[1]; tname text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
BEGIN
  WITH j AS (SELECT to_jsonb(n.*) AS r, count(*) OVER () AS total FROM citapulse_new n),
       ins AS (
         INSERT INTO ev_v3t (tenant, kind, event_type, tbl, op, row_data, xid, horizon)
         SELECT c.tenant, fam, citapulse.event_type(fam, 'INSERT', c.r, NULL), tname, 'INSERT', c.r, (SELECT pg_current_xact_id()), (SELECT pg_snapshot_xmin(pg_current_snapshot()))
           FROM (SELECT j.r, j.r ->> tenant_col AS tenant, j.total FROM j) c
          WHERE c.total <= (SELECT s.bulk_threshold FROM citapulse.settings s)
            AND CASE WHEN c.tenant IS NULL THEN false WHEN octet_length(c.tenant) <= 255 THEN true ELSE citapulse.count_oversized_tenant() END
         RETURNING 1)
  SELECT count(pg_notify('citapulse', '')) INTO dummy FROM citapulse.wakeup w WHERE w.notify AND EXISTS (SELECT 1 FROM ins);
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON v3t_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION v3t_cap('negocio_id','appointment');

-- SQL version 4's write path taken apart (an inbox with only its key, no table read):
-- i1 = capture() minus the oversized-tenant guard; i2 = minus the guard and the bulk
-- count; i3 = i2 without SECURITY DEFINER; i4 = i2 without the kind/tbl/op/created_at
-- columns (tenant and row only, like the lean floor).
CREATE TABLE in_1 (LIKE citapulse.inbox INCLUDING ALL);
CREATE TABLE in_2 (LIKE citapulse.inbox INCLUDING ALL);
CREATE TABLE in_3 (LIKE citapulse.inbox INCLUDING ALL);
CREATE TABLE in_4 (id bigserial PRIMARY KEY, tenant text, row_data jsonb);
CREATE TABLE i1_citas (LIKE citas INCLUDING ALL);
CREATE TABLE i2_citas (LIKE citas INCLUDING ALL);
CREATE TABLE i3_citas (LIKE citas INCLUDING ALL);
CREATE TABLE i4_citas (LIKE citas INCLUDING ALL);
CREATE OR REPLACE FUNCTION i1_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1]; threshold pg_catalog.int4 := COALESCE(TG_ARGV[2], '100');
BEGIN
  INSERT INTO public.in_1 (tenant, kind, tbl, op, row_data)
  SELECT c.tenant, fam, (SELECT pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)), 'INSERT', c.r
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant
            FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE (SELECT pg_catalog.count(*) FROM citapulse_new) OPERATOR(pg_catalog.<=) threshold AND c.tenant IS NOT NULL;
  IF FOUND THEN IF citapulse.notifying() THEN PERFORM pg_catalog.pg_notify('citapulse', ''); END IF; END IF;
  RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION i2_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1];
BEGIN
  INSERT INTO public.in_2 (tenant, kind, tbl, op, row_data)
  SELECT c.tenant, fam, (SELECT pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)), 'INSERT', c.r
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant
            FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE c.tenant IS NOT NULL;
  IF FOUND THEN IF citapulse.notifying() THEN PERFORM pg_catalog.pg_notify('citapulse', ''); END IF; END IF;
  RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION i3_cap() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE tenant_col pg_catalog.text := TG_ARGV[0]; fam pg_catalog.text := TG_ARGV[1];
BEGIN
  INSERT INTO public.in_3 (tenant, kind, tbl, op, row_data)
  SELECT c.tenant, fam, (SELECT pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)), 'INSERT', c.r
    FROM (SELECT j.r, j.r OPERATOR(pg_catalog.->>) tenant_col AS tenant
            FROM (SELECT pg_catalog.to_jsonb(n.*) AS r FROM citapulse_new n OFFSET 0) j) c
   WHERE c.tenant IS NOT NULL;
  IF FOUND THEN IF citapulse.notifying() THEN PERFORM pg_catalog.pg_notify('citapulse', ''); END IF; END IF;
  RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION i4_cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  INSERT INTO public.in_4 (tenant, row_data) SELECT n.negocio_id, pg_catalog.to_jsonb(n.*) FROM citapulse_new n;
  IF FOUND THEN IF citapulse.notifying() THEN PERFORM pg_catalog.pg_notify('citapulse', ''); END IF; END IF;
  RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT ON i1_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION i1_cap('negocio_id','appointment','100');
CREATE TRIGGER c AFTER INSERT ON i2_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION i2_cap('negocio_id','appointment');
CREATE TRIGGER c AFTER INSERT ON i3_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION i3_cap('negocio_id','appointment');
CREATE TRIGGER c AFTER INSERT ON i4_citas REFERENCING NEW TABLE AS citapulse_new FOR EACH STATEMENT EXECUTE FUNCTION i4_cap();
