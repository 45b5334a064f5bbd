//! The autoscaler's policy: pure functions of what the scheduler reports and the time.
//!
//! - [`decide`]: one decision round ([`decide::Policy::decide`]): scale-up for pending
//!   demand, `min_nodes` and headroom, with failover past groups backing off; scale-down.
//! - [`backoff`]: how long a group waits after a provider error.
//! - [`limits`]: the caps no scale-up crosses.
//! - `round`: the steps of one round.
//! - [`scale_down`]: which idle nodes go.

pub mod backoff;
pub mod decide;
pub mod limits;
mod round;
pub mod scale_down;
