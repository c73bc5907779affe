//! WAL file names (what PostgreSQL asks `wal-fetch` for) and WAL archive keys. See
//! `soma_agent::fuzzing::wal_name` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soma_agent::fuzzing::wal_name(data));
