//! Store listings: the keys the catalog and the WAL archive decode, indexed into a recoverable
//! window. See `soma_agent::fuzzing::store_listing` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soma_agent::fuzzing::store_listing(data));
