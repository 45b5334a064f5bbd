//! Subcommands with more than a few lines of their own.

pub(crate) mod bench;
pub(crate) mod sim;
