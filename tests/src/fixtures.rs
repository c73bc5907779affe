//! Databases the tests back up.

use crate::pg::PgCluster;

/// SQL that builds a small but varied application database (see the file's header).
pub const VARIED_SCHEMA_SQL: &str = include_str!("../fixtures/appdb.sql");

/// Creates database `db` and fills it with [`VARIED_SCHEMA_SQL`].
pub fn create_varied_database(pg: &PgCluster, db: &str) {
    pg.createdb(db);
    pg.psql(db, VARIED_SCHEMA_SQL);
}

/// Creates table `table` in `db` holding about `megabytes` MB of text that compresses poorly
/// (hex digits of md5 hashes of random numbers: zstd gets it to about half, never much smaller),
/// so a backup of it takes long enough to be observed and interrupted.
pub fn create_big_table(pg: &PgCluster, db: &str, table: &str, megabytes: u64) {
    // Each row carries 8 md5 hex strings: 256 bytes of payload.
    let rows = megabytes * 1024 * 1024 / 256;
    pg.psql(
        db,
        &format!(
            "create table {table} (id bigint primary key, payload text not null);
             insert into {table}
             select i, md5(random()::text) || md5(random()::text) || md5(random()::text)
                    || md5(random()::text) || md5(random()::text) || md5(random()::text)
                    || md5(random()::text) || md5(random()::text)
             from generate_series(1, {rows}) i;"
        ),
    );
}
