//! Driver-side helpers for tests and fuzzing.
