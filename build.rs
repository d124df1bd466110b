//! Build script. The library needs nothing built; with the `grpc-example`
//! feature (this repository's `grpc_purge` example and its test) it compiles
//! `examples/proto/purge.proto` with the protoc binary that the
//! `protoc-bin-vendored` crate ships, so nothing has to be installed.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "grpc-example")]
    if let Err(e) = grpc_example() {
        println!("cargo:warning=compiling examples/proto/purge.proto: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "grpc-example")]
fn grpc_example() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "examples/proto/purge.proto";
    println!("cargo:rerun-if-changed={proto}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[proto], &["examples/proto"])?;
    Ok(())
}
