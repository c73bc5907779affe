//! Compiles `proto/soma/v1/agent.proto` with protox, a pure-Rust protobuf compiler, so that a fresh
//! machine builds the contract without a system `protoc`.
use std::{env, path::PathBuf};

use prost::Message;

fn main() {
    let proto = "proto/soma/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("compile soma.v1 protobuf contract");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    // The encoded descriptor set feeds the agent's gRPC server reflection.
    std::fs::write(out.join("soma_v1_descriptor.bin"), fds.encode_to_vec())
        .expect("write descriptor set");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .expect("generate soma.v1 gRPC code");
}
