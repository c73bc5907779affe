//! pg_dump custom archives read for restore-drill validation data. See
//! `soma_agent::fuzzing::pg_dump_archive` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soma_agent::fuzzing::pg_dump_archive(data));
