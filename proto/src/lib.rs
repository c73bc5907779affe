//! The gRPC contract (`soma.v1`) shared by `soma-agent` and `kubectl-soma`.
//!
//! Generated at build time from `proto/soma/v1/agent.proto`; see that file for the semantics of each
//! call. The descriptor set is exported for gRPC server reflection, so `grpcurl` works against an
//! agent without a local copy of the `.proto` file.

/// Generated messages and service stubs for package `soma.v1`.
// A result event carries a whole BackupInfo; events are few, so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("soma.v1");
}

pub mod id;
pub mod time;

pub use id::{BackupId, IdEngine, InvalidBackupId};

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/soma_v1_descriptor.bin"));

impl v1::Engine {
    /// Short lower-case name used in backup ids, manifests and the CLI.
    pub fn short_name(self) -> &'static str {
        match self {
            v1::Engine::Postgres => "postgres",
            v1::Engine::Qdrant => "qdrant",
            v1::Engine::Set => "set",
            v1::Engine::Unspecified => "unspecified",
        }
    }
}
