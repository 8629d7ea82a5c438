-- citapulse-bench trigger cost: one single-row UPDATE (a status change) per transaction.
-- The harness seeds :rows rows first (ids 1..rows after a TRUNCATE … RESTART IDENTITY).
\set id random(1, :rows)
UPDATE citas SET estado = CASE estado WHEN 'pendiente' THEN 'confirmada' ELSE 'pendiente' END
 WHERE id = :id;
