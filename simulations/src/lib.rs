//! berth's capacity-planning simulator: replays workloads against the real placement
//! engine, state machine and autoscaler policy in virtual time.
//!
//! # Layout
//! - [`openb`]: the FGD paper's placement experiment on the Alibaba openb traces
//!   (`berth sim openb`).
//! - [`images`]: image-aware placement measured: cache hit rate and packing per image
//!   rule on a synthetic pool (`berth sim images`).
//! - [`scenario`]: scenario files and synthetic arrival processes (`berth sim run`).
//! - [`engine`]: the discrete-event loop: placement, the autoscaler round, sim clouds.
//! - [`report`]: summary.json, series.csv, SVG plots, report.html.
//! - [`synthetic`]: seeded synthetic fleets and sandbox mixes (benchmarks, tests).

pub mod engine;
pub mod images;
pub mod openb;
pub mod report;
pub mod scenario;
pub mod synthetic;
