//! Scenario module: vm.
