//! Fuzz target: imagefs_store::fuzzing::record_log (see that module).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imagefs_store::fuzzing::record_log(data));
