//! berth's exit codes, shared by the CLI's parsing (`cli`) and the commands, so neither
//! depends on the other for them.

/// Exit code of a command that failed (an invalid config, an unreachable cluster).
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage error (bad flags, a bad log filter).
pub(crate) const EXIT_USAGE: u8 = 2;
