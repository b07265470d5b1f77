//! Compiles the protobuf definitions in `proto/` with a vendored `protoc`, so building
//! needs neither apt nor a download.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let protos = [
        root.join("herald/ipam/v1/ipam.proto"),
        root.join("herald/routing/v1/routing.proto"),
    ];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("herald_descriptor.bin"))
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}
