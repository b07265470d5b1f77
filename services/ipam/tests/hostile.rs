//! Hostile input for every RPC of both services, generated from the descriptors so a new
//! RPC or field is covered the day it is added: for each field of each request message
//! (and of the messages inside it, two levels down), the wrong wire type, numbers out of
//! range, unknown enum values, strings that are not UTF-8 or are 64 KiB long, lengths past
//! the end, and repeated fields and maps with 20,000 entries; plus seeded random bytes.
//! Sent as raw bytes to the real `herald-ipam` over gRPC. Every one must be answered with a
//! status a client can act on (never INTERNAL, UNKNOWN or a broken stream), in a short
//! message; a refused one must change nothing; and the server must neither panic nor stop.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::time::Duration;

use bytes::{Buf, BufMut};
use common::{Server, allocate, allocate_ok, create_pool, pool};
use herald_api::ipam::v1 as pb;
use herald_api::routing::v1 as rpb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_test_support::free_port;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The longest status message allowed, whatever was sent: Herald cuts what it echoes to
/// 1 KiB, and the rest of a message is a sentence.
const MESSAGE_LIMIT: usize = 1400;
/// How deep the generator follows message fields into nested messages.
const DEPTH: usize = 2;
/// Entries sent in a repeated field or map.
const MANY: usize = 20_000;
/// Random byte strings sent to each RPC.
const RANDOM_CASES: usize = 24;
/// How long a case may take to be answered (a streaming RPC: to answer or to open).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Passes request and response bytes through untouched, so a test can send what no
/// generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Every message of the descriptor set by full name (".herald.ipam.v1.Pool"), nested ones
/// included.
fn messages(set: &FileDescriptorSet) -> HashMap<String, DescriptorProto> {
    fn add(prefix: &str, message: &DescriptorProto, into: &mut HashMap<String, DescriptorProto>) {
        let name = format!("{prefix}.{}", message.name());
        for nested in &message.nested_type {
            add(&name, nested, into);
        }
        into.insert(name, message.clone());
    }
    let mut all = HashMap::new();
    for file in &set.file {
        for message in &file.message_type {
            add(&format!(".{}", file.package()), message, &mut all);
        }
    }
    all
}

struct Method {
    path: String,
    input: String,
    streaming: bool,
}

fn methods(set: &FileDescriptorSet) -> Vec<Method> {
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                out.push(Method {
                    path: format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    input: method.input_type().to_string(),
                    streaming: method.server_streaming(),
                });
            }
        }
    }
    out
}

fn key(number: i32, wire_type: WireType) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(u32::try_from(number).unwrap(), wire_type, &mut out);
    out
}

fn varint(value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_varint(value, &mut out);
    out
}

/// `number` as a length-delimited field holding `payload`.
fn delimited(number: i32, payload: &[u8]) -> Vec<u8> {
    let mut out = key(number, WireType::LengthDelimited);
    out.extend(varint(payload.len() as u64));
    out.extend_from_slice(payload);
    out
}

fn expected_wire_type(field: &FieldDescriptorProto) -> WireType {
    match field.r#type() {
        Type::Double | Type::Fixed64 | Type::Sfixed64 => WireType::SixtyFourBit,
        Type::Float | Type::Fixed32 | Type::Sfixed32 => WireType::ThirtyTwoBit,
        Type::String | Type::Bytes | Type::Message | Type::Group => WireType::LengthDelimited,
        _ => WireType::Varint,
    }
}

/// One field of every wire type, each with a payload that is well formed for that type.
fn every_wire_type(number: i32) -> Vec<(WireType, Vec<u8>)> {
    vec![
        (
            WireType::Varint,
            [key(number, WireType::Varint), varint(7)].concat(),
        ),
        (
            WireType::SixtyFourBit,
            [key(number, WireType::SixtyFourBit), vec![1; 8]].concat(),
        ),
        (WireType::LengthDelimited, delimited(number, b"abc")),
        (
            WireType::ThirtyTwoBit,
            [key(number, WireType::ThirtyTwoBit), vec![1; 4]].concat(),
        ),
        // A group that never ends.
        (WireType::StartGroup, key(number, WireType::StartGroup)),
    ]
}

/// A minimal valid element of `field`'s type, as one occurrence of the field.
fn one_element(field: &FieldDescriptorProto, index: usize) -> Vec<u8> {
    match expected_wire_type(field) {
        WireType::Varint => [key(field.number(), WireType::Varint), varint(1)].concat(),
        WireType::SixtyFourBit => {
            [key(field.number(), WireType::SixtyFourBit), vec![0; 8]].concat()
        }
        WireType::ThirtyTwoBit => {
            [key(field.number(), WireType::ThirtyTwoBit), vec![0; 4]].concat()
        }
        _ if field.r#type() == Type::Message => {
            // A map entry needs distinct keys to stay 20,000 entries; any other message
            // is sent empty.
            let entry = if field.type_name().ends_with("Entry") {
                delimited(1, format!("k{index}").as_bytes())
            } else {
                Vec::new()
            };
            delimited(field.number(), &entry)
        }
        _ => delimited(field.number(), format!("e{index}").as_bytes()),
    }
}

/// The hostile encodings of one message, each with one field made hostile, labelled by the
/// path of the field.
fn hostile(
    all: &HashMap<String, DescriptorProto>,
    message: &str,
    path: &str,
    depth: usize,
) -> Vec<(String, Vec<u8>)> {
    let Some(descriptor) = all.get(message) else {
        return Vec::new();
    };
    let mut cases = Vec::new();
    for field in &descriptor.field {
        let number = field.number();
        let here = format!("{path}.{}", field.name());
        let expected = expected_wire_type(field);
        let repeated = field.label() == Label::Repeated;
        for (wire_type, bytes) in every_wire_type(number) {
            // Repeated numbers may come packed (length-delimited) as well.
            let also_valid = repeated
                && expected != WireType::LengthDelimited
                && wire_type == WireType::LengthDelimited;
            if wire_type != expected && !also_valid {
                cases.push((format!("{here}: wire type {wire_type:?}"), bytes));
            }
        }
        match field.r#type() {
            Type::Int32
            | Type::Int64
            | Type::Uint32
            | Type::Uint64
            | Type::Sint32
            | Type::Sint64
            | Type::Bool
            | Type::Enum => {
                for value in [u64::MAX, 1 << 32, 1 << 31, i64::MIN as u64, 999] {
                    cases.push((
                        format!("{here} = {value}"),
                        [key(number, WireType::Varint), varint(value)].concat(),
                    ));
                }
                // A varint that never ends.
                cases.push((
                    format!("{here}: unterminated varint"),
                    [key(number, WireType::Varint), vec![0xff; 11]].concat(),
                ));
            }
            Type::String => {
                cases.push((
                    format!("{here}: not UTF-8"),
                    delimited(number, &[0xff, 0xfe, b'a']),
                ));
                cases.push((
                    format!("{here}: 64 KiB"),
                    delimited(number, &vec![b'x'; 64 * 1024]),
                ));
            }
            Type::Bytes => {
                cases.push((
                    format!("{here}: 64 KiB"),
                    delimited(number, &vec![0xab; 64 * 1024]),
                ));
            }
            Type::Message if depth < DEPTH => {
                for (label, inner) in hostile(all, field.type_name(), &here, depth + 1) {
                    cases.push((label, delimited(number, &inner)));
                }
            }
            _ => {}
        }
        if expected == WireType::LengthDelimited {
            // A length that runs past the end of the message.
            cases.push((
                format!("{here}: length past the end"),
                [
                    key(number, WireType::LengthDelimited),
                    varint(1000),
                    b"abc".to_vec(),
                ]
                .concat(),
            ));
        }
        if repeated {
            let many: Vec<u8> = (0..MANY).flat_map(|i| one_element(field, i)).collect();
            cases.push((format!("{here}: {MANY} entries"), many));
        }
    }
    cases
}

/// Seeded bytes (xorshift), so a failure names a case that can be sent again.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// What a client can see of the server's state: pools with their capacity, allocations,
/// nodes and the BGP policy.
async fn state(channel: &Channel) -> String {
    let mut ipam = herald_api::ipam::v1::ipam_client::IpamClient::new(channel.clone());
    let mut routing = RoutingClient::new(channel.clone());
    let pools = ipam
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner();
    let allocations = ipam
        .list_allocations(pb::ListAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let nodes = routing
        .list_nodes(rpb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let policy = routing
        .get_bgp_policy(rpb::GetBgpPolicyRequest::default())
        .await
        .unwrap()
        .into_inner();
    format!("{pools:?}\n{allocations:?}\n{nodes:?}\n{policy:?}")
}

/// Sends `bytes` to `path` and returns the status it was answered with (OK for an answer
/// or, on a streaming RPC, for a stream that opened and stayed quiet).
async fn send(
    channel: &Channel,
    path: &str,
    streaming: bool,
    bytes: Vec<u8>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(path.to_string()).unwrap();
    let request = tonic::Request::new(bytes);
    let answer = async {
        if streaming {
            let mut stream = grpc
                .server_streaming(request, path, RawCodec)
                .await?
                .into_inner();
            // An open stream with nothing to say yet is an accepted request.
            match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
                Ok(message) => message.map(|_| ()),
                Err(_) => Ok(()),
            }
        } else {
            grpc.unary(request, path, RawCodec).await.map(|_| ())
        }
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded("no answer")),
    }
}

/// herald-ipam on SQLite in `dir`, its output in `dir/herald-ipam.log`.
async fn start(dir: &Path) -> Server {
    let log = File::create(dir.join("herald-ipam.log")).unwrap();
    let err = log.try_clone().unwrap();
    Server::start_with(dir, None, free_port(), |command| {
        command.env("RUST_LOG", "info").stdout(log).stderr(err);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_to_every_rpc_are_refused_cleanly_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path()).await;
    let channel = server.channel().await.unwrap();

    // Something to lose: a pool, a Service's address and its endpoints, a node, a policy.
    let mut ipam = server.client().await;
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    allocate_ok(&mut ipam, allocate("keeper")).await;
    let mut routing = RoutingClient::new(channel.clone());
    routing
        .upsert_node(rpb::Node {
            name: "n1".into(),
            addresses: vec!["127.0.0.10".into()],
            ready: true,
            ..Default::default()
        })
        .await
        .unwrap();
    routing
        .set_bgp_policy(rpb::BgpPolicy {
            local_asn: 65010,
            peers: vec![rpb::Peer {
                name: "tor".into(),
                address: "127.0.0.1".into(),
                asn: 65001,
                ..Default::default()
            }],
            advertisements: vec![rpb::Advertisement::default()],
            ..Default::default()
        })
        .await
        .unwrap();

    let set = FileDescriptorSet::decode(herald_api::FILE_DESCRIPTOR_SET).unwrap();
    let all = messages(&set);
    let methods: Vec<Method> = methods(&set)
        .into_iter()
        .filter(|m| m.path.starts_with("/herald."))
        .collect();
    assert!(
        methods.len() >= 20,
        "the descriptors list every RPC: {}",
        methods.len()
    );

    let mut before = state(&channel).await;
    let (mut sent, mut refused, mut accepted) = (0usize, 0usize, 0usize);
    let mut violations = Vec::new();
    for method in &methods {
        let mut cases = hostile(&all, &method.input, "", 0);
        for seed in 0..RANDOM_CASES {
            cases.push((
                format!("random bytes #{seed}"),
                random_bytes(seed as u64, 1 + seed * 7),
            ));
        }
        assert!(!cases.is_empty(), "{}: no cases generated", method.path);
        for (label, bytes) in cases {
            sent += 1;
            let case = format!("{} {label}", method.path);
            match send(&channel, &method.path, method.streaming, bytes).await {
                Ok(()) => {
                    // Still a valid request (an unknown enum value read as the default, a
                    // number that fits): it may change state, which becomes the new baseline.
                    accepted += 1;
                    before = state(&channel).await;
                }
                Err(status) => {
                    refused += 1;
                    if matches!(
                        status.code(),
                        Code::Internal
                            | Code::Unknown
                            | Code::Unavailable
                            | Code::DataLoss
                            | Code::Unimplemented
                            | Code::DeadlineExceeded
                            | Code::Cancelled
                    ) {
                        violations.push(format!(
                            "{case}: {:?} {}",
                            status.code(),
                            status.message().chars().take(200).collect::<String>()
                        ));
                    }
                    if status.message().len() > MESSAGE_LIMIT {
                        violations
                            .push(format!("{case}: a {}-byte message", status.message().len()));
                    }
                    // A request that did not even decode never reached a handler: the
                    // check after the method's last case covers those together.
                    if !status
                        .message()
                        .starts_with("the request is not a valid protobuf message")
                    {
                        let after = state(&channel).await;
                        if after != before {
                            violations.push(format!(
                                "{case}: refused ({:?}) but the state changed",
                                status.code()
                            ));
                            before = after;
                        }
                    }
                }
            }
        }
        let after = state(&channel).await;
        if after != before {
            violations.push(format!(
                "{}: the state changed under requests that were refused",
                method.path
            ));
            before = after;
        }
    }
    println!(
        "{sent} hostile requests to {} RPCs: {refused} refused, {accepted} accepted as valid",
        methods.len()
    );
    assert!(server.process.is_running(), "herald-ipam stopped");
    server.wait_serving(Duration::from_secs(5)).await;
    let log = std::fs::read_to_string(dir.path().join("herald-ipam.log")).unwrap();
    if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
        violations.push(format!(
            "herald-ipam panicked: {}",
            line.chars().take(300).collect::<String>()
        ));
    }
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    // Most of what the generator sends is malformed: a generator that produced only valid
    // requests would prove nothing.
    assert!(refused * 10 >= sent * 8, "only {refused} of {sent} refused");
}
