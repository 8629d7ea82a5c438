-- citapulse-bench trigger cost: one single-row INSERT per transaction, 1 000 tenants.
\set tenant random(1, 1000)
INSERT INTO citas (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado)
VALUES ('pgb_' || :tenant, 'c' || :tenant, 'p1', 's1', current_date, '09:00', '09:30', 'pendiente');
