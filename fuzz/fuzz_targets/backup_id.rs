//! Backup ids as users type them and listings hold them (`soma_proto::BackupId`). See
//! `soma_agent::fuzzing::backup_id` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soma_agent::fuzzing::backup_id(data));
