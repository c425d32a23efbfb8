//! bucketfs: a native FUSE file system for S3 and S3-compatible servers.
//!
//! Layers, top to bottom (see the README's design section):
//! `cli`/`fluid` build [`spec::MountSpec`]s; [`mount`] mounts and serves them;
//! [`fuse`] translates kernel requests; [`fs`] is the file system; [`store`]
//! is the object-store boundary.

pub mod check;
pub mod cli;
pub mod daemon;
pub mod fluid;
pub mod fs;
pub mod fstab;
pub mod fuse;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod passthrough;
pub mod probe;
pub mod spec;
pub mod store;
pub mod sync;
pub mod warm;
