//! End-to-end scenarios, one module each: real binaries, real FUSE mounts, real guests.

mod agent;
mod crash;
mod ext4;
mod fleet;
mod fleet_rollout;
mod fullguest;
mod metrics;
mod mount;
mod powercut;
mod remote;
mod remote_cli;
mod remote_cluster;
mod remote_gc;
mod remote_lazy;
mod rollout;
mod store;
mod vm;
