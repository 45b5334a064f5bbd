//! The autoscaler's policy: pure functions of what the scheduler reports and the time.
//!
//! Built so far: [`scale_down`]. Scale-up (bin-packing pending demand onto instance
//! templates with the scheduler's placement code), provider backoff and failover, the
//! budget and rate caps come with the rest of issue #6.

pub mod scale_down;
