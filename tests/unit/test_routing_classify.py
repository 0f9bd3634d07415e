"""The routing corpus: where each statement must go, decided by the real parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from millpond.errors import ConfigError
from millpond.routing.classify import MAX_CACHED_LENGTH, Classifier, Route

R = Route.REPLICA
P = Route.PRIMARY

# (statement, where it must go). Grouped by what they exercise.
CORPUS: list[tuple[str, Route]] = [
    # plain reads
    ("SELECT 1", R),
    ("select * from users where id = $1", R),
    ("SELECT a, b FROM t JOIN u USING (id) WHERE x > $1 ORDER BY a LIMIT 10 OFFSET 5", R),
    ("VALUES (1, 'a'), (2, 'b')", R),
    ("TABLE users", R),
    ("SELECT * FROM t1 UNION ALL SELECT * FROM t2", R),
    ("SELECT count(*), max(id), min(id), avg(score) FROM t GROUP BY kind HAVING count(*) > 1", R),
    ("SELECT id, row_number() OVER (PARTITION BY kind ORDER BY id) FROM t", R),
    ("SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE active)", R),
    ("SELECT EXISTS (SELECT 1 FROM t WHERE id = $1)", R),
    ("SELECT * FROM generate_series(1, 10) AS g(i)", R),
    ("SELECT lower(name), upper(name), length(name), coalesce(nick, name) FROM users", R),
    ("SELECT now(), current_timestamp, current_date, clock_timestamp()", R),
    ("SELECT extract(epoch FROM now() - created), date_trunc('day', created) FROM t", R),
    ("SELECT data->>'name', jsonb_build_object('a', 1), to_jsonb(t) FROM t", R),
    ("SELECT substring(s FROM 2 FOR 3), trim(both ' ' FROM s), position('x' IN s) FROM t", R),
    ("SELECT pg_catalog.lower('A')", R),
    ("SELECT current_setting('work_mem'), version(), pg_is_in_recovery()", R),
    ("SELECT CASE WHEN a > 0 THEN 'pos' ELSE 'neg' END, greatest(a, b), nullif(a, 0) FROM t", R),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", R),
    ("SELECT DISTINCT ON (kind) * FROM t ORDER BY kind, id", R),
    ("SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.t_id = t.id LIMIT 1) x", R),
    # CTEs
    ("WITH x AS (SELECT * FROM t) SELECT * FROM x", R),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) TABLE r", R),
    ("WITH x AS MATERIALIZED (SELECT id FROM t) SELECT count(*) FROM x", R),
    ("WITH d AS (DELETE FROM t WHERE id = $1 RETURNING *) SELECT * FROM d", P),
    ("WITH i AS (INSERT INTO log(msg) VALUES ('x') RETURNING id) SELECT id FROM i", P),
    ("WITH u AS (UPDATE t SET n = n + 1 RETURNING n) SELECT sum(n) FROM u", P),
    ("WITH a AS (SELECT 1), b AS (DELETE FROM t RETURNING 1) SELECT * FROM a", P),
    ("WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x", P),
    # locking reads
    ("SELECT * FROM t WHERE id = $1 FOR UPDATE", P),
    ("SELECT * FROM t FOR UPDATE SKIP LOCKED", P),
    ("SELECT * FROM t FOR NO KEY UPDATE NOWAIT", P),
    ("SELECT * FROM t FOR SHARE", P),
    ("SELECT * FROM t FOR KEY SHARE OF t", P),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", P),
    ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)", P),
    # DML
    ("INSERT INTO t (a) VALUES ($1)", P),
    ("INSERT INTO t SELECT * FROM u", P),
    ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET n = excluded.n", P),
    ("UPDATE t SET a = $1 WHERE id = $2", P),
    ("DELETE FROM t WHERE id = $1", P),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET n = u.n", P),
    ("SELECT * INTO new_table FROM t", P),
    ("CREATE TABLE t2 AS SELECT * FROM t", P),
    # DDL and maintenance
    ("CREATE TABLE t (id int PRIMARY KEY)", P),
    ("ALTER TABLE t ADD COLUMN n int", P),
    ("DROP TABLE IF EXISTS t", P),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", P),
    ("TRUNCATE t", P),
    ("GRANT SELECT ON t TO app", P),
    ("COMMENT ON TABLE t IS 'x'", P),
    ("CREATE TEMP TABLE tmp (a int)", P),
    ("REFRESH MATERIALIZED VIEW mv", P),
    ("VACUUM ANALYZE t", P),
    ("ANALYZE t", P),
    ("CREATE SEQUENCE s", P),
    # functions
    ("SELECT nextval('s')", P),
    ("SELECT setval('s', 42)", P),
    ("SELECT currval('s')", P),
    ("SELECT my_function($1)", P),
    ("SELECT * FROM my_set_returning_function()", P),
    ("SELECT app.report(1)", P),
    ("SELECT count(*) FROM t WHERE f(x) > 0", P),
    ("SELECT set_config('app.user', 'x', false)", P),
    ("SELECT pg_advisory_lock(1)", P),
    ("SELECT pg_notify('ch', 'msg')", P),
    ("SELECT txid_current()", P),
    ("SELECT pg_current_wal_lsn()", P),
    ('SELECT "LOWER"(name) FROM t', P),
    ("SELECT pg_catalog.nextval('s')", P),
    # comments
    ("-- a comment\nSELECT 1", R),
    ("/* leading */ SELECT * FROM t /* trailing */", R),
    ("SELECT 1 -- DELETE FROM t", R),
    ("/* SELECT */ DELETE FROM t", P),
    ("SELECT '; DELETE FROM t' AS s", R),
    ("SELECT $$ UPDATE t SET a = 1 $$", R),
    ("-- only a comment", P),
    ("", P),
    # several statements
    ("SELECT 1; SELECT 2", R),
    ("SELECT 1; DELETE FROM t", P),
    ("UPDATE t SET a = 1; SELECT * FROM t", P),
    ("SELECT 1; SET search_path = app", P),
    ("BEGIN; SELECT 1; COMMIT", P),
    # EXPLAIN
    ("EXPLAIN SELECT * FROM t", R),
    ("EXPLAIN ANALYZE SELECT * FROM t", R),
    ("EXPLAIN INSERT INTO t VALUES (1)", R),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", P),
    ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t", P),
    ("EXPLAIN (ANALYZE false) UPDATE t SET a = 1", R),
    ("EXPLAIN (ANALYZE off, COSTS off) DELETE FROM t", R),
    ("EXPLAIN ANALYZE SELECT nextval('s')", P),
    ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", P),
    ("EXPLAIN EXECUTE stmt(1)", P),
    # COPY
    ("COPY t TO STDOUT", R),
    ("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH (FORMAT csv)", R),
    ("COPY (SELECT nextval('s')) TO STDOUT", P),
    ("COPY t FROM STDIN", P),
    ("COPY t TO '/tmp/t.csv'", P),
    ("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", P),
    # SHOW, SET and session statements
    ("SHOW work_mem", R),
    ("SHOW ALL", R),
    ("SET work_mem = '64MB'", P),
    ("SET LOCAL statement_timeout = 1000", P),
    ("RESET ALL", P),
    ("SET SESSION AUTHORIZATION app", P),
    ("DISCARD ALL", P),
    ("LISTEN ch", P),
    ("NOTIFY ch, 'x'", P),
    ("PREPARE q AS SELECT 1", P),
    ("EXECUTE q", P),
    ("DEALLOCATE q", P),
    ("DECLARE c CURSOR FOR SELECT * FROM t", P),
    ("FETCH 10 FROM c", P),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", P),
    ("DO $$ BEGIN PERFORM 1; END $$", P),
    ("CALL my_procedure()", P),
    ("CHECKPOINT", P),
    # transaction control
    ("BEGIN", P),
    ("BEGIN READ ONLY", P),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", P),
    ("COMMIT", P),
    ("ROLLBACK", P),
    ("SAVEPOINT s1", P),
    # not SQL the parser accepts
    ("SELEC 1", P),
    ("SELECT FROM WHERE", P),
    ("SELECT * FROM t WHERE", P),
    ("\\d users", P),
]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 60
    assert len({q for q, _ in CORPUS}) == len(CORPUS), "duplicate statements"


@pytest.mark.parametrize(("query", "route"), CORPUS, ids=[q[:50] or "<empty>" for q, _ in CORPUS])
def test_corpus(query: str, route: Route) -> None:
    verdict = Classifier().classify(query)
    assert verdict.route is route, verdict.reason


# psycopg's placeholders are rewritten before parsing.
FORMAT_CORPUS: list[tuple[str, Route]] = [
    ("SELECT * FROM t WHERE id = %s", R),
    ("SELECT * FROM t WHERE id = %(id)s AND kind = %(kind)s", R),
    ("SELECT * FROM t WHERE name LIKE 'a%%'", R),
    ("SELECT %b::bytea, %t", R),
    ("INSERT INTO t VALUES (%s, %s)", P),
    ("UPDATE t SET a = %(a)s WHERE id = %(id)s", P),
    ("SELECT * FROM t WHERE id = %s FOR UPDATE", P),
]


@pytest.mark.parametrize(("query", "route"), FORMAT_CORPUS)
def test_format_placeholders(query: str, route: Route) -> None:
    verdict = Classifier(placeholders="format").classify(query)
    assert verdict.route is route, verdict.reason


def test_dollar_style_does_not_understand_percent_s() -> None:
    verdict = Classifier().classify("SELECT * FROM t WHERE id = %s")
    assert verdict.route is P
    assert verdict.reason.startswith("unparseable")


def test_reasons_name_the_cause() -> None:
    c = Classifier()
    assert "FOR SHARE" in c.classify("SELECT * FROM t FOR SHARE").reason
    assert "nextval" in c.classify("SELECT nextval('s')").reason
    assert "DELETE" in c.classify("WITH d AS (DELETE FROM t RETURNING 1) SELECT 1").reason
    assert "multi-statement" in c.classify("SELECT 1; DELETE FROM t").reason
    assert c.classify("SELECT 1").reason == "read-only"


def test_user_functions_can_be_allowed() -> None:
    c = Classifier(read_only_functions=["my_function", "App.Report"])
    assert c.route("SELECT my_function(1)") is R
    assert c.route("SELECT app.report(1)") is R
    assert c.route("SELECT report(1)") is P  # only the schema-qualified name was allowed
    assert c.route("SELECT other.my_function(1)") is P


def test_allowing_a_function_clears_cached_verdicts() -> None:
    c = Classifier()
    assert c.route("SELECT f()") is P
    c.allow_functions(["f"])
    assert c.route("SELECT f()") is R


@pytest.mark.parametrize("name", ["nextval", "pg_catalog.setval", "SET_CONFIG", ""])
def test_write_functions_cannot_be_allowed(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        Classifier(read_only_functions=[name])
    assert info.value.setting == "read_only_functions"


def test_cache_hits_and_bound() -> None:
    c = Classifier(cache_size=3)
    for q in ("SELECT 1", "SELECT 2", "SELECT 1"):
        c.classify(q)
    assert (c.hits, c.misses, c.cached) == (1, 2, 2)
    for i in range(10):
        c.classify(f"SELECT {i + 10}")
    assert c.cached == 3
    assert c.classify("SELECT 19").route is R
    assert c.hits == 2  # the newest entries survive


def test_cache_returns_the_same_verdict_object() -> None:
    c = Classifier()
    assert c.classify("SELECT * FROM t") is c.classify("SELECT * FROM t")


def test_huge_queries_are_classified_but_not_cached() -> None:
    c = Classifier()
    query = "SELECT " + ", ".join(["1"] * (MAX_CACHED_LENGTH // 3 + 1))
    assert c.route(query) is R
    assert c.cached == 0


def test_bad_settings() -> None:
    with pytest.raises(ConfigError):
        Classifier(placeholders="qmark")
    with pytest.raises(ConfigError):
        Classifier(cache_size=-1)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gets_a_verdict(text: str) -> None:
    verdict = Classifier(cache_size=0).classify(text)
    assert verdict.route in (R, P)


# Entries that hold a statement (not just a comment or nothing).
STATEMENTS = [q for q, _ in CORPUS if Classifier().classify(q).reason != "no statement"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(STATEMENTS), min_size=1, max_size=4))
def test_joined_statements_go_to_replica_only_if_all_do(queries: list[str]) -> None:
    c = Classifier()
    expected = dict(CORPUS)
    joined = "\n;\n".join(queries)  # a newline first ends any trailing -- comment
    want = P if any(expected[q] is P for q in queries) else R
    assert c.route(joined) is want
