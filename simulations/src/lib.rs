//! berth's capacity-planning simulator: replays workloads (the Alibaba openb traces,
//! synthetic generators) against the real placement engine and autoscaler policy in virtual
//! time.
//!
//! Nothing is built here yet: the openb replay comes with issue #3 and the scenario
//! simulator with issue #7. `berth sim` says so and exits non-zero.
//!
//! # Layout
//! (no modules yet)
