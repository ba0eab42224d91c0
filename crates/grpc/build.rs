//! Compiles protos/{kmsgate,k8s,google/rpc} with protox (pure Rust), so building needs no system `protoc`, and
//! keeps the kmsgate.v1 descriptor set for server reflection.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../protos";
    let files = [
        "kmsgate/v1/types.proto",
        "kmsgate/v1/kms.proto",
        "kmsgate/v1/secrets.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
        "k8s/kms/v2/api.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={root}/{f}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);

    // Reflection describes the public API only (the k8s plugin lives on its own unix socket).
    let api = protox::compile(["kmsgate/v1/kms.proto", "kmsgate/v1/secrets.proto"], [root])?;
    std::fs::write(out.join("kmsgate_v1_descriptor.bin"), api.encode_to_vec())?;

    let all = protox::compile(files, [root])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(all)?;
    Ok(())
}
