-- The reference appointment schema (DESIGN.md §2) and its watch() calls.
SET client_min_messages = warning;
-- Idempotent; run after sql/install.sql.
CREATE TABLE IF NOT EXISTS citas (
    id             bigserial PRIMARY KEY,
    negocio_id     text NOT NULL,
    cliente_id     text,
    profesional_id text,
    servicio_id    text,
    fecha          date,
    hora_inicio    time,
    hora_fin       time,
    estado         text NOT NULL DEFAULT 'pendiente'
                   CHECK (estado IN ('pendiente', 'confirmada', 'atendida', 'cancelada'))
);
-- The default stats query filters by tenant, then counts by estado and fecha.
CREATE INDEX IF NOT EXISTS citas_negocio_fecha_idx ON citas (negocio_id, fecha);
-- Reminders scan the appointments of the days around now, every few seconds, by fecha.
CREATE INDEX IF NOT EXISTS citas_fecha_idx ON citas (fecha);

CREATE TABLE IF NOT EXISTS horarios (
    id             bigserial PRIMARY KEY,
    negocio_id     text NOT NULL,
    profesional_id text,
    dia_semana     smallint CHECK (dia_semana BETWEEN 0 AND 6),
    hora_inicio    time,
    hora_fin       time
);
CREATE INDEX IF NOT EXISTS horarios_negocio_idx ON horarios (negocio_id);

-- Each appointment also goes to its professional's and its client's channel
-- (usuario:<negocio_id>:<profesional_id>, usuario:<negocio_id>:<cliente_id>).
SELECT citapulse.watch('public.citas'::regclass, tenant_column => 'negocio_id', kind => 'appointment',
                       route_columns => ARRAY['profesional_id', 'cliente_id']);
SELECT citapulse.watch('public.horarios'::regclass, tenant_column => 'negocio_id', kind => 'schedule');
