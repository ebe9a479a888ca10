//! Scenario module: mount.
