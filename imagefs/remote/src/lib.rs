//! imagefs-remote: the remotes of a store (their configuration, kept in the store directory)
//! and the S3 client that implements `imagefs_store::remote::Remote` with the `object_store`
//! crate. The store library itself learns no HTTP; the CLI builds an [`S3Remote`] from a
//! [`RemoteConfig`] and hands it to the store's push and pull.

mod config;
mod s3;

pub use config::{
    parse_duration, parse_url, Credentials, RemoteConfig, Remotes, RemotesError, DEFAULT_TIMEOUT,
};
pub use s3::S3Remote;
