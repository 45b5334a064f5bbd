//! The autoscaler's policy: pure functions of what the scheduler reports and the time.
//!
//! Built so far: [`scale_down`] and the caps of [`limits`]. Scale-up itself (bin-packing
//! pending demand onto instance templates with the scheduler's placement code), provider
//! backoff and failover come with the rest of issue #6.

pub mod limits;
pub mod scale_down;
