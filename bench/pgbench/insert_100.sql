-- citapulse-bench trigger cost: one 100-row INSERT per transaction (one tenant per statement;
-- 100 rows is events.bulk_threshold, so every row is still logged as its own event).
\set tenant random(1, 1000)
INSERT INTO citas (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado)
SELECT 'pgb_' || :tenant, 'c' || g, 'p1', 's1', current_date + (g % 7), '09:00', '09:30', 'pendiente'
  FROM generate_series(1, 100) AS g;
