# Bypass corpus: statements and the verdict a read-only grant must give them.
#
# The grant (examples/readonly.yaml): identity `agent` on target `app` may use classes read,
# session and transaction on objects public.*, pg_catalog.* and information_schema.*.
# Each case is a marker line `-- allow` or `-- deny` followed by its SQL (one or more lines) up
# to the next marker. Used by the classifier's unit test and, end to end, through psql.

-- allow
SELECT * FROM users
-- allow
select id, email from public.users where id = 1
-- allow
SeLeCt CoUnT(*) FrOm UsErS
-- allow
SELECT /* comment; DELETE FROM users */ 1
-- allow
SELECT 1 -- ; DROP TABLE users
-- allow
SELECT $$DROP TABLE users$$ AS just_text
-- allow
SELECT $tag$ '; DELETE FROM users; -- $tag$ AS dollar_quoted
-- allow
SELECT U&'\0064rop table users' AS unicode_escape_text
-- allow
WITH u AS (SELECT * FROM users) SELECT count(*) FROM u
-- allow
SELECT * FROM users u JOIN users v ON u.id = v.id
-- allow
SELECT lower(email), length(email) FROM users ORDER BY 1
-- allow
SELECT relname FROM pg_catalog.pg_class LIMIT 1
-- allow
SELECT table_name FROM information_schema.tables LIMIT 1
-- allow
SHOW search_path
-- allow
SET application_name = 'agent'
-- allow
SET statement_timeout = '5s'
-- allow
BEGIN; SELECT 1; COMMIT
-- allow
BEGIN READ ONLY; SELECT count(*) FROM users; ROLLBACK
-- allow
EXPLAIN SELECT * FROM users
-- allow
SELECT now(), current_user, version()
-- allow
SELECT json_build_object('id', id, 'email', email) FROM users
-- allow
VALUES (1), (2)
-- allow
SELECT EXISTS (SELECT 1 FROM users WHERE id = 1)
-- allow
BEGIN; DECLARE c CURSOR FOR SELECT * FROM users; FETCH 1 FROM c; CLOSE c; COMMIT
-- allow
PREPARE p AS SELECT * FROM users WHERE id = $1; EXECUTE p(1); DEALLOCATE p
-- allow
SELECT 'x' || chr(59) || 'y'
-- allow
SELECT * FROM "users"
-- allow
select * from users where email = E'\x27; drop table users; --'
-- allow
SELECT pg_catalog.lower('X')
-- allow
SELECT * FROM users TABLESAMPLE SYSTEM (50)
-- allow
SELECT string_agg(email, ',') FROM (SELECT email FROM users ORDER BY id) s
-- allow
SELECT row_to_json(u) FROM users u

-- deny
DELETE FROM users
-- deny
INSERT INTO users VALUES (99, 'x@example.com')
-- deny
UPDATE users SET email = 'x'
-- deny
TRUNCATE users
-- deny
DROP TABLE users
-- deny
CREATE TABLE t (x int)
-- deny
CREATE TEMP TABLE t (x int)
-- deny
ALTER TABLE users ADD COLUMN x int
-- deny
COMMENT ON TABLE users IS 'x'
-- deny
GRANT SELECT ON users TO PUBLIC
-- deny
CREATE ROLE evil
-- deny
ALTER ROLE agent_ro SUPERUSER
-- deny
SET ROLE postgres
-- deny
SET SESSION AUTHORIZATION postgres
-- deny
RESET ALL
-- deny
SET default_transaction_read_only = off
-- deny
SET search_path = evil, public
-- deny
SET standard_conforming_strings = off
-- deny
SET row_security = off
-- deny
SET client_encoding = 'SJIS'
-- deny
SET NAMES 'BIG5'
-- deny
SELECT set_config('search_path', 'evil', false)
-- deny
SELECT pg_catalog.set_config('role', 'postgres', false)
-- deny
BEGIN READ WRITE
-- deny
START TRANSACTION READ WRITE
-- deny
SET TRANSACTION READ WRITE
-- deny
SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE
-- deny
SELECT * FROM users FOR UPDATE
-- deny
SELECT * FROM users FOR SHARE
-- deny
LOCK TABLE users
-- deny
SELECT pg_advisory_lock(1)
-- deny
NOTIFY chan, 'x'
-- deny
SELECT pg_notify('chan', 'x')
-- deny
LISTEN chan
-- deny
SELECT lo_import('/etc/passwd')
-- deny
SELECT lo_create(0)
-- deny
SELECT 1 FROM users WHERE id IN (SELECT lo_unlink(1))
-- deny
SELECT pg_read_file('/etc/passwd')
-- deny
COPY users TO '/tmp/chaperone-corpus-out'
-- deny
COPY users FROM PROGRAM 'id'
-- deny
COPY users FROM STDIN
-- deny
DO $$BEGIN DELETE FROM users; END$$
-- deny
DO $$BEGIN EXECUTE 'DROP TABLE users'; END$$
-- deny
DO $$BEGIN PERFORM 1; END$$
-- deny
WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d
-- deny
SELECT * INTO users_copy FROM users
-- deny
CREATE TABLE c AS SELECT * FROM users
-- deny
EXPLAIN ANALYZE DELETE FROM users
-- deny
SELECT 1; DELETE FROM users
-- deny
select 1 /* ; */ ; delete from users
-- deny
DeLeTe FrOm UsErS
-- deny
SELECT U&'\0027'; DROP TABLE users
-- deny
LOAD 'auto_explain'
-- deny
CREATE EXTENSION dblink
-- deny
ALTER SYSTEM SET work_mem = '1GB'
-- deny
VACUUM users
-- deny
CLUSTER users
-- deny
REINDEX TABLE users
-- deny
CHECKPOINT
-- deny
DISCARD ALL
-- deny
CALL some_proc()
-- deny
SELECT query_to_xml('delete from users', true, true, '')
-- deny
PREPARE d AS DELETE FROM users
-- deny
EXECUTE never_prepared
-- deny
SELECT * FROM secret_schema.t
-- deny
SELECT pg_sleep(10)
-- deny
SELECT * FROM users; SELECT pg_terminate_backend(1)
-- deny
SELECT nextval('s')
-- deny
SELECT * FROM users LIMIT (SELECT count(*) FROM pg_catalog.pg_class WHERE pg_reload_conf())
-- deny
CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql
-- deny
MERGE INTO users USING (SELECT 1 AS id) s ON users.id = s.id WHEN MATCHED THEN DELETE
-- deny
REFRESH MATERIALIZED VIEW mv
-- deny
SELECT * FROM dblink('', 'delete from users') AS t(x int)
-- deny
this is not sql
-- deny
SELECT 'unterminated
-- deny
CREATE RULE r AS ON SELECT TO users DO INSTEAD NOTHING
-- deny
WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) INSERT INTO users SELECT n, 'x' FROM r
-- deny
PREPARE TRANSACTION ''
-- deny
COMMIT PREPARED ''
-- deny
COPY users TO ''
-- deny
WITH users AS (SELECT 1) DELETE FROM users
-- deny
WITH secret_schema AS (SELECT 1), t AS (SELECT * FROM secret_schema.t) SELECT * FROM t
-- deny
SELECT /*t5*/ --
'
'; SET default_transaction_read_only = off; SELECT '--'
-- deny
SELECT * FROM users TABLESAMPLE system_rows (1)
-- deny
SELECT (1.5::float8).pg_sleep
-- deny
SELECT (pid).pg_terminate_backend FROM pg_stat_activity WHERE pid <> pg_backend_pid()
-- deny
SELECT ('SELECT to_tsvector(set_config(''default_transaction_read_only'',''off'',false))').ts_stat
-- deny
SELECT (7::bigint).pg_try_advisory_lock
-- deny
SELECT json_scalar(1)
-- deny
COPY users TO '' (FORMAT csv, NULL stdout)
-- allow
SELECT u.email, u.id FROM users u WHERE u.id = 1
