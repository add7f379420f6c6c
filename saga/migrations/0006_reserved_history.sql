-- Placeholder on the retention branch for a migration another helper owns: drop it when the real
-- 0006 migration is merged (two files of one version are refused, so a forgotten one fails).
SELECT 1;
