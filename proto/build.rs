//! Generates the tonic code for awq/v1/awq.proto with the vendored protoc (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free in edition 2021: build scripts are single-threaded here.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=awq/v1/awq.proto");
    tonic_prost_build::configure().compile_protos(&["awq/v1/awq.proto"], &["."])?;
    Ok(())
}
