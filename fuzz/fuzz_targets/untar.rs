//! Base-backup tar archives unpacked into a data directory (the archive is hostile). See
//! `soma_agent::fuzzing::untar` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soma_agent::fuzzing::untar(data));
