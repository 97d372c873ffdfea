//! Job API, planner, scheduler, state store and output assembly of awq-cluster.
//!
//! Empty until the distributed issue: the coordinator will validate jobs, cut a model's blocks into
//! contiguous ranges (one per worker), dispatch them, track progress in a `Store` (memory or etcd)
//! and assemble returned shards into the output checkpoint. It never computes on tensor values.
