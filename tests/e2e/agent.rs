//! Scenario module: agent.
