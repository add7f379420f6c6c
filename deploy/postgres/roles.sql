-- The engine's three roles, for a cluster where the user running `saga migrate` may not create
-- roles (no CREATEROLE): a superuser runs this once per cluster, then `saga migrate` as that
-- user grants on each database's objects (migration 0007). Safe to run again.
--
--   psql -v ON_ERROR_STOP=1 -v migrator=saga_deploy -f deploy/postgres/roles.sql
--
-- `migrator` names the login user that runs `saga migrate`; it becomes a member of
-- saga_migrator. Login users for the engine and for dashboards are made below, commented out:
-- choose their names and how they authenticate (password, certificate, IAM).
DO $$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY['saga_migrator', 'saga_engine', 'saga_readonly'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = wanted) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', wanted);
        END IF;
    END LOOP;
END
$$;

GRANT saga_migrator TO :"migrator";

-- CREATE ROLE saga_worker LOGIN PASSWORD '...' IN ROLE saga_engine;   -- workers, relays, clients
-- CREATE ROLE saga_grafana LOGIN PASSWORD '...' IN ROLE saga_readonly; -- dashboards, operators
