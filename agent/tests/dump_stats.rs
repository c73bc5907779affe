//! The validation data a backup reads from pg_dump's archive against a real PostgreSQL 15: it
//! equals what a drill computes over the same tables with `COPY`, whatever the database's own
//! settings for the text forms; it counts every row; a changed, missing or extra row changes it;
//! the stream may arrive in pieces of any size; a cut or damaged archive is an error, never a
//! panic.

use std::path::PathBuf;

use soma_agent::testing::{DumpStats, DumpTee, Postgres, TableStats, dump_stats};
use soma_tests::{PgCluster, fixtures, pg::PG_BIN_DIR};
use tokio::io::AsyncReadExt;

/// Tables beyond the fixture's: names to quote, a generated column, no columns at all, rows that
/// span many data chunks, and the types whose text depends on session settings.
const EXTRA: &str = r#"
create schema "we""ird\sch";
create table "we""ird\sch"."ta ble é" (id int, note text, g int generated always as (id * 2) stored);
insert into "we""ird\sch"."ta ble é" (id, note) select i, E'a\tb\\c\n' || i from generate_series(1, 50) i;
create table public.no_columns ();
insert into public.no_columns default values;
insert into public.no_columns default values;
create table public.settings_bound (
    ts timestamptz, d date, iv interval, f float8, r real, b bytea, n numeric);
insert into public.settings_bound
select timestamptz '2024-03-01 12:34:56.789+05' + i * interval '1 hour 7 seconds',
       date '2024-02-28' + i, interval '1 day 2 hours' * i, 1.0 / (i + 3), (i / 7.0)::real,
       decode(md5(i::text), 'hex'), i * 1.5
from generate_series(1, 500) i;
create table public.many (id bigint, payload text);
insert into public.many select i, md5(i::text) || repeat('x', i % 97) from generate_series(1, 60000) i;
create unlogged table public.scratchpad (k int);
insert into public.scratchpad values (1), (2), (3);
alter database appdb set timezone = 'Asia/Kathmandu';
alter database appdb set datestyle = 'SQL, DMY';
alter database appdb set intervalstyle = 'sql_standard';
alter database appdb set extra_float_digits = 0;
alter database appdb set bytea_output = 'escape';
"#;

fn postgres(pg: &PgCluster, db: &str) -> Postgres {
    Postgres::new(&pg.url(db), Some(PathBuf::from(PG_BIN_DIR))).expect("a valid URL")
}

/// The dump as the backup reads it: pg_dump's stdout through the tee, and the bytes it passed.
async fn dump(pg: &Postgres, db: &str) -> (DumpStats, Vec<u8>) {
    let mut process = pg.start_dump(db).expect("pg_dump starts");
    let (mut tee, stats) = DumpTee::new(process.stdout());
    let mut bytes = Vec::new();
    tee.read_to_end(&mut bytes).await.expect("pg_dump's output");
    drop(tee);
    process.wait().await.expect("pg_dump succeeds");
    let stats = stats.await.unwrap().expect("pg_dump's archive parses");
    (stats, bytes)
}

async fn copied(pg: &Postgres, db: &str, dumped: &DumpStats) -> Vec<TableStats> {
    let names: Vec<(String, String)> = dumped
        .tables
        .iter()
        .map(|t| (t.schema.clone(), t.table.clone()))
        .collect();
    pg.copy_stats(db, dumped.encoding.as_deref(), |s, t| {
        names.iter().any(|(ns, nt)| ns == s && nt == t)
    })
    .await
    .expect("the tables copy out")
}

fn table<'a>(tables: &'a [TableStats], name: &str) -> &'a TableStats {
    tables
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("{name} not in {tables:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dump_and_the_copied_tables_agree_and_every_change_shows() {
    let cluster = PgCluster::start();
    fixtures::create_varied_database(&cluster, "appdb");
    cluster.psql("appdb", EXTRA);
    let pg = postgres(&cluster, "appdb");

    let (dumped, bytes) = dump(&pg, "appdb").await;
    assert_eq!(dumped.encoding.as_deref(), Some("UTF8"));
    // Every ordinary table of the database, with exactly its rows.
    let counts = cluster.psql(
        "appdb",
        "select n.nspname || '.' || c.relname || '=' || \
           (xpath('/row/n/text()', query_to_xml(format('select count(*) as n from only %I.%I', n.nspname, c.relname), false, true, '')))[1]::text \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema') \
           and n.nspname not like 'pg_toast%' order by 1",
    );
    let mut recorded: Vec<String> = dumped
        .tables
        .iter()
        .map(|t| format!("{}={}", t.name(), t.rows))
        .collect();
    recorded.sort();
    let mut expected: Vec<String> = counts.lines().map(str::to_owned).collect();
    expected.sort();
    assert_eq!(recorded, expected);
    assert_eq!(table(&dumped.tables, "public.many").rows, 60000);
    assert_eq!(table(&dumped.tables, "public.no_columns").rows, 2);

    // The drill's function over the same tables gives the same numbers, under the database's
    // own odd settings for dates, intervals, floats and bytea.
    let found = copied(&pg, "appdb", &dumped).await;
    assert_eq!(found, dumped.tables);

    // The same archive in pieces of 1 to 7 bytes gives the same result.
    for piece in [1, 3, 7] {
        let reader = tokio::io::BufReader::with_capacity(piece, &bytes[..]);
        assert_eq!(
            dump_stats(reader).await.unwrap(),
            dumped,
            "pieces of {piece}"
        );
    }
    // Cut anywhere, it is an error; damaged, it never panics.
    for cut in [0, 5, 100, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        assert!(dump_stats(&bytes[..cut]).await.is_err(), "cut at {cut}");
    }
    for at in (0..bytes.len()).step_by(bytes.len() / 200 + 1) {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x5a;
        let _ = dump_stats(&damaged[..]).await;
    }

    // A changed row changes the checksum and not the count; a missing or an extra row, the count.
    let many = table(&dumped.tables, "public.many").clone();
    cluster.psql(
        "appdb",
        "update public.many set payload = payload || 'y' where id = 777",
    );
    let changed = copied(&pg, "appdb", &dumped).await;
    assert_eq!(table(&changed, "public.many").rows, many.rows);
    assert_ne!(table(&changed, "public.many").checksum, many.checksum);
    let others = |t: &[TableStats]| -> Vec<TableStats> {
        t.iter()
            .filter(|t| t.name() != "public.many")
            .cloned()
            .collect()
    };
    assert_eq!(others(&changed), others(&dumped.tables));
    cluster.psql("appdb", "delete from public.many where id = 778");
    let missing = copied(&pg, "appdb", &dumped).await;
    assert_eq!(table(&missing, "public.many").rows, many.rows - 1);
    cluster.psql(
        "appdb",
        "insert into public.many values (778, md5('778') || repeat('x', 778 % 97)), (60001, 'extra')",
    );
    cluster.psql(
        "appdb",
        "update public.many set payload = md5('777') || repeat('x', 777 % 97) where id = 777",
    );
    let extra = copied(&pg, "appdb", &dumped).await;
    assert_eq!(table(&extra, "public.many").rows, many.rows + 1);
    cluster.psql("appdb", "delete from public.many where id = 60001");
    // Back to the dumped rows, stored in another order: the same again.
    assert_eq!(copied(&pg, "appdb", &dumped).await, dumped.tables);
}
