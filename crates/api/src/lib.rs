//! Generated protobuf types and gRPC stubs. Domain crates never use these types directly:
//! services convert at their edge (see `herald-ipam`'s `convert` module).

#![allow(clippy::doc_markdown, clippy::large_enum_variant)]

pub mod ipam {
    pub mod v1 {
        tonic::include_proto!("herald.ipam.v1");
    }
}

pub mod routing {
    pub mod v1 {
        tonic::include_proto!("herald.routing.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Herald proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");
