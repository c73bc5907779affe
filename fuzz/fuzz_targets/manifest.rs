//! Backup manifests (`backups/<id>/manifest.json`) as read from the store. See
//! `soma_agent::fuzzing::manifest` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soma_agent::fuzzing::manifest(data));
