//! berth's capacity-planning simulator: replays workloads against the real placement
//! engine, state machine and autoscaler policy in virtual time.
//!
//! # Layout
//! - [`openb`]: the FGD paper's placement experiment on the Alibaba openb traces
//!   (`berth sim openb`).
//! - [`scenario`]: scenario files and synthetic arrival processes (`berth sim run`).
//! - [`engine`]: the discrete-event loop: placement, the autoscaler round, sim clouds.
//! - [`report`]: summary.json, series.csv, SVG plots, report.html.
//! - [`synthetic`]: seeded synthetic fleets and sandbox mixes (benchmarks, tests).

pub mod engine;
pub mod openb;
pub mod report;
pub mod scenario;
pub mod synthetic;
