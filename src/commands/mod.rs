//! Subcommands with more than a few lines of their own.

pub(crate) mod bench;
pub(crate) mod bench_create;
pub(crate) mod scheduler;
pub(crate) mod sim;
