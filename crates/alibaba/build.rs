//! Compiles protos/alibaba/*.proto with protox (pure Rust), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = "../../protos/alibaba";
    let file = format!("{dir}/instance.proto");
    println!("cargo:rerun-if-changed={file}");
    let descriptors = protox::compile([file.as_str()], [dir])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
