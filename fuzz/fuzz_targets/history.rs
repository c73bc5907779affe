//! Timeline history files read from the WAL archive. See `soma_agent::fuzzing::history` for the
//! properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soma_agent::fuzzing::history(data));
