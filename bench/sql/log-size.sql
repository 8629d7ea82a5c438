-- Bytes per event in citapulse.events (heap and indexes), for sizing the log: run on a
-- scratch database after sql/install.sql and sql/example_schema.sql, as a superuser:
--   psql "$SCRATCH_URL" -f bench/sql/log-size.sql
-- 50 000 single-statement INSERTs of 50 rows (below the bulk threshold, so one event each)
-- with the reference schema's columns, then 20 000 single-row UPDATEs (old and new row).
\set ON_ERROR_STOP 1
DO $$ BEGIN FOR i IN 1..1000 LOOP
  INSERT INTO citas (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado)
  SELECT 'negocio_' || (g % 50), 'cliente_' || g, 'prof_' || (g % 20), 'serv_' || (g % 10),
         current_date + (g % 30), '09:00', '09:30', 'pendiente'
    FROM generate_series(1, 50) g;
END LOOP; END $$;
SELECT citapulse.move_inbox(1000000) AS moved_inserts;
VACUUM ANALYZE citapulse.events;
SELECT 'insert' AS event, count(*) AS events,
       pg_total_relation_size('citapulse.events') / count(*) AS bytes_per_event,
       pg_relation_size('citapulse.events') / count(*) AS heap_bytes_per_event
  FROM citapulse.events;
TRUNCATE citapulse.events;
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT id FROM citas ORDER BY id LIMIT 20000 LOOP
    UPDATE citas SET estado = 'confirmada' WHERE id = r.id;
  END LOOP;
END $$;
SELECT citapulse.move_inbox(1000000) AS moved_updates;
VACUUM ANALYZE citapulse.events;
SELECT 'update' AS event, count(*) AS events,
       pg_total_relation_size('citapulse.events') / count(*) AS bytes_per_event,
       pg_relation_size('citapulse.events') / count(*) AS heap_bytes_per_event
  FROM citapulse.events;
