//! Scenario module: store.
