//! The awq.v1 wire protocol: the .proto files and the tonic code generated from them, nothing else.
//!
//! Empty until the distributed issue lands the job service (submit, watch, cancel), the worker
//! service (register, lease, assignments, shard streams) and the stage-to-stage transfer. The crate
//! exists now so that the dependency graph (cli and coordinator and worker -> proto) is fixed from
//! the start.
