//! Fuzz target: imagefs_store::fuzzing::overlay_record (see that module).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imagefs_store::fuzzing::overlay_record(data));
