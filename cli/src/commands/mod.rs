//! One module per subcommand.

pub mod auth;
pub mod bench;
pub mod bench_serve;
pub mod cluster;
pub mod deploy;
pub mod eval;
pub mod import;
pub mod inspect;
pub mod jobs;
pub mod local;
pub mod quantize;
pub mod serve;
pub mod synthetic;
