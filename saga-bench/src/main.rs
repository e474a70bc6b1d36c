//! `saga-bench`: saga throughput and latency against the raw-NATS floor.

fn main() {}
