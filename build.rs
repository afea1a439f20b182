//! Generates the kairos.v1 gRPC code with protox, so no system `protoc` is needed.

use std::{env, path::PathBuf};

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(
        [
            "kairos/v1/task.proto",
            "kairos/v1/events.proto",
            "kairos/v1/recurring.proto",
            "kairos/v1/scheduler.proto",
            "kairos/v1/status.proto",
            "kairos/v1/queue.proto",
        ],
        ["proto"],
    )?;
    // Reflection serves this descriptor set so grpcurl and buf curl need no proto files.
    std::fs::write(out_dir.join("kairos_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .server_mod_attribute(".", r#"#[cfg(feature = "server")]"#)
        // Decoded from a NATS message's `Bytes`, the payload is a view of it,
        // not a copy, and reaches the handler without another.
        .bytes(".kairos.v1.TaskEnvelope.payload")
        .compile_fds(fds)?;
    Ok(())
}
