//! berth's capacity-planning simulator: replays workloads against the real placement
//! engine and state machine (and, with issue #7, the autoscaler policy) in virtual time.
//!
//! # Layout
//! - [`openb`]: the FGD paper's placement experiment on the Alibaba openb traces
//!   (`berth sim openb`).
//! - [`synthetic`]: seeded synthetic fleets and sandbox mixes (benchmarks, tests).

pub mod engine;
pub mod openb;
pub mod report;
pub mod scenario;
pub mod synthetic;
