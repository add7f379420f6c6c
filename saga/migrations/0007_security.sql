-- Security: the deployment namespace of idempotency keys, and the database roles.
--
-- Each run keeps the key prefix (SAGA_KEY_PREFIX) of the process that started it: a prefix
-- changed on a live deployment changes the keys of runs started afterwards, never those of a
-- run in flight. Existing runs keep '' (their keys had no prefix).
ALTER TABLE saga_runs ADD COLUMN key_prefix text NOT NULL DEFAULT '';

-- Three roles, none of which can log in (grant them to login users):
--   saga_migrator  owns the engine's tables, sequences and functions; runs `saga migrate`
--                  (saga.migrate switches to it for every migration after this one)
--   saga_engine    what workers, relays and clients need: read and write the tables, use the
--                  sequences, run the functions; the migrations table read-only
--   saga_readonly  SELECT on every table: dashboards, operators
-- Roles belong to the whole cluster, so the first database migrated creates them, concurrently
-- migrated databases tolerate each other, and every database grants on its own objects.
--
-- Rule for later migrations: run as saga_migrator, the objects they create are the migrator's,
-- and the default privileges below give saga_engine read and write and saga_readonly SELECT on
-- every new table, sequence and function. A migration creating a table the engine must not
-- write revokes that itself; one that creates objects as another role grants them explicitly.
DO $$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY['saga_migrator', 'saga_engine', 'saga_readonly'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = wanted) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', wanted);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- another database's migration created it meanwhile
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION USING
                        ERRCODE = 'insufficient_privilege',
                        MESSAGE = format('role %I does not exist and %I may not create roles',
                                         wanted, current_user),
                        HINT = 'have a superuser run deploy/postgres/roles.sql once for the '
                               'cluster (or give this user CREATEROLE), then run saga migrate again';
            END;
        END IF;
    END LOOP;
    IF NOT pg_has_role(current_user, 'saga_migrator', 'MEMBER') THEN
        BEGIN
            EXECUTE format('GRANT saga_migrator TO %I', current_user);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION USING
                ERRCODE = 'insufficient_privilege',
                MESSAGE = format('%I is not a member of saga_migrator and may not join it',
                                 current_user),
                HINT = format('as a superuser: GRANT saga_migrator TO %I; then saga migrate',
                              current_user);
        END;
    END IF;
END
$$;

-- The migrator owns what the engine's migrations made (the saga_* objects of this schema, and
-- only those: other tables sharing the schema get no grant), and the other two get their rights.
DO $$
DECLARE
    object record;
    kind text;
BEGIN
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO saga_migrator', current_schema());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO saga_engine, saga_readonly', current_schema());
    FOR object IN
        SELECT c.relname, c.relkind FROM pg_class c
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relname LIKE 'saga\_%'
          AND c.relkind IN ('r', 'p', 'S', 'v', 'm')
    LOOP
        kind := CASE object.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                    WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END;
        EXECUTE format('ALTER %s %I OWNER TO saga_migrator', kind, object.relname);
        IF object.relkind = 'S' THEN
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %I TO saga_engine', object.relname);
            EXECUTE format('GRANT SELECT ON SEQUENCE %I TO saga_readonly', object.relname);
        ELSE
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO saga_engine',
                           object.relname);
            EXECUTE format('GRANT SELECT ON %I TO saga_readonly', object.relname);
        END IF;
    END LOOP;
    FOR object IN
        SELECT p.oid::regprocedure AS signature FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'saga\_%'
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO saga_migrator', object.signature);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO saga_engine', object.signature);
    END LOOP;
    -- What later migrations create as the migrator gets the same.
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE saga_migrator IN SCHEMA %I '
                   'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO saga_engine', current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE saga_migrator IN SCHEMA %I '
                   'GRANT USAGE, SELECT ON SEQUENCES TO saga_engine', current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE saga_migrator IN SCHEMA %I '
                   'GRANT EXECUTE ON FUNCTIONS TO saga_engine', current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE saga_migrator IN SCHEMA %I '
                   'GRANT SELECT ON TABLES TO saga_readonly', current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE saga_migrator IN SCHEMA %I '
                   'GRANT SELECT ON SEQUENCES TO saga_readonly', current_schema());
END
$$;

-- The engine reads the schema version (workers refuse a database behind their code); only
-- the migrator records one.
REVOKE INSERT, UPDATE, DELETE ON saga_schema_migrations FROM saga_engine;
