-- citapulse-bench: the tables of the contestants that are not citapulse.
--
-- citas_bare feeds the Node.js baseline (channel bench_bare) and citas_floor the bare
-- LISTEN floor (channel bench_floor). Both are copies of citas with a plain row trigger
-- that sends the whole row with pg_notify: what a LISTEN/NOTIFY forwarder is fed by.
-- Every contestant writes the same rows, so WAL and fsync costs are the same.
-- citas_relay_row feeds the bare Rust relay (channel bench_relay, the whole row: what
-- pg_eventserv is fed by) and citas_relay_keyed the keyed relay (channel
-- bench_relay_keyed, an empty payload: the relay reads the rows by key).
SET client_min_messages = warning;

CREATE TABLE IF NOT EXISTS citas_bare (LIKE citas INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
CREATE TABLE IF NOT EXISTS citas_floor (LIKE citas INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
CREATE TABLE IF NOT EXISTS citas_relay_row (LIKE citas INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
CREATE TABLE IF NOT EXISTS citas_relay_keyed (LIKE citas INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);

-- TG_ARGV[0]: the NOTIFY channel.
CREATE OR REPLACE FUNCTION bench_notify_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], row_to_json(NEW)::text);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER bench_notify AFTER INSERT ON citas_bare
    FOR EACH ROW EXECUTE FUNCTION bench_notify_row('bench_bare');
CREATE OR REPLACE TRIGGER bench_notify AFTER INSERT ON citas_floor
    FOR EACH ROW EXECUTE FUNCTION bench_notify_row('bench_floor');
CREATE OR REPLACE TRIGGER bench_notify AFTER INSERT ON citas_relay_row
    FOR EACH ROW EXECUTE FUNCTION bench_notify_row('bench_relay');

-- TG_ARGV[0]: the NOTIFY channel; the payload is empty (a wake-up).
CREATE OR REPLACE FUNCTION bench_notify_empty() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER bench_notify AFTER INSERT ON citas_relay_keyed
    FOR EACH ROW EXECUTE FUNCTION bench_notify_empty('bench_relay_keyed');
