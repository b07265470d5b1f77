//! Who may call what: the caller's identity comes from its client certificate (mutual
//! TLS, `herald_tls::identity`), and [`allowed`] is the table of methods each role may
//! call. [`AuthzLayer`] refuses everything else with PERMISSION_DENIED naming the identity
//! and the method, before the request is decoded; a speaker's own-node rule needs the
//! request's `node` field, so those two handlers call [`check_node`].
//!
//! Over plaintext (only on a loopback listener, or when `allow_plaintext` says so) there
//! is no identity and everything is allowed, as before mutual TLS existed.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use herald_tls::{Identity, Role};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The caller of one request, for the handlers: a TLS identity, or plaintext.
#[derive(Debug, Clone)]
pub enum Caller {
    Tls(Identity),
    Plaintext,
}

/// What each role may call, by gRPC path (`/package.Service/Method`). Health and
/// reflection are open to every authenticated caller; a method not listed is refused.
pub fn allowed(role: &Role, path: &str) -> bool {
    use Role::{AnySpeaker, Operator, Reader, Speaker, Watcher};
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    let reads = matches!(role, Watcher | Operator | Reader);
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => true,
        "herald.ipam.v1.Ipam" => match method {
            // The watcher mirrors the IPPool custom resources (and imported MetalLB and
            // Cilium pools) into pools: it creates and updates them, and deletes one when
            // its resource is deleted (forced only by the resource's annotation).
            "CreatePool" | "UpdatePool" | "DeletePool" => matches!(role, Operator | Watcher),
            "Allocate" | "AllocateBatch" | "Release" => matches!(role, Watcher),
            "GetPool" | "ListPools" | "GetAllocation" | "ListAllocations" | "History" | "Watch" => {
                reads
            }
            _ => false,
        },
        "herald.routing.v1.Routing" => match method {
            "UpsertNode" | "DeleteNode" | "SetServiceEndpoints" | "SetServiceEndpointsBatch" => {
                matches!(role, Watcher)
            }
            // The watcher mirrors the BGPPeer custom resources into the policy.
            "SetBgpPolicy" => matches!(role, Operator | Watcher),
            "GetBgpPolicy" | "ListNodes" | "GetAdvertisementStatus" => reads,
            // Which node's is checked by the handler (`check_node`).
            "WatchNodeRoutes" | "ReportSpeakerState" => matches!(role, Speaker { .. } | AnySpeaker),
            _ => false,
        },
        _ => false,
    }
}

/// A speaker may only watch and report for its own node; the speakers' shared identity
/// names none, so it may for any. Plaintext callers pass.
pub fn check_node<T>(request: &tonic::Request<T>, node: &str, method: &str) -> Result<(), Status> {
    match request.extensions().get::<Caller>() {
        Some(Caller::Tls(identity)) => match &identity.role {
            Role::Speaker { node: own } if own == node => Ok(()),
            Role::AnySpeaker => Ok(()),
            Role::Speaker { node: own } => Err(Status::permission_denied(format!(
                "{identity} may not call {method} for node `{}`: a speaker may only call it for its own node `{own}`",
                herald_model::shorten(node, 80)
            ))),
            other => Err(Status::permission_denied(format!(
                "{identity} may not call {method}: role `{}` is not a speaker",
                other.name()
            ))),
        },
        Some(Caller::Plaintext) | None => Ok(()),
    }
}

/// Whether secrets (BGP MD5 passwords) may go to the caller of `request`: over mutual
/// TLS, or in plaintext only to a loopback peer (this host: tests and the local
/// walkthrough). Plaintext from anywhere else crosses a network where anyone on the path
/// reads it, and anyone who reaches the port could ask for any node's peers.
pub fn may_receive_secrets<T>(request: &tonic::Request<T>) -> bool {
    match request.extensions().get::<Caller>() {
        Some(Caller::Tls(_)) => true,
        // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d, which
        // `is_loopback` alone would not count.
        Some(Caller::Plaintext) | None => request
            .remote_addr()
            .is_some_and(|addr| addr.ip().to_canonical().is_loopback()),
    }
}

/// The layer for `Server::builder().layer(..)`.
#[derive(Debug, Clone)]
pub struct AuthzLayer {
    trust_domain: Arc<str>,
}

impl AuthzLayer {
    pub fn new(trust_domain: &str) -> Self {
        AuthzLayer {
            trust_domain: Arc::from(trust_domain),
        }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            trust_domain: Arc::clone(&self.trust_domain),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authz<S> {
    inner: S,
    trust_domain: Arc<str>,
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .map(|info| info.peer_certs());
        let caller = match certs {
            None => Caller::Plaintext,
            Some(certs) => {
                let path = request.uri().path();
                let method = path.trim_start_matches('/');
                let Some(leaf) = certs.as_ref().and_then(|c| c.first().cloned()) else {
                    return Either::Left(ready(Ok(Status::permission_denied(format!(
                        "a caller without a client certificate may not call {method}"
                    ))
                    .into_http())));
                };
                match herald_tls::identity::identity(&leaf, &self.trust_domain) {
                    Ok(identity) if allowed(&identity.role, path) => Caller::Tls(identity),
                    Ok(identity) => {
                        return Either::Left(ready(Ok(Status::permission_denied(format!(
                            "{identity} may not call {method} (role `{}`)",
                            identity.role.name()
                        ))
                        .into_http())));
                    }
                    Err(e) => {
                        return Either::Left(ready(Ok(Status::permission_denied(format!(
                            "may not call {method}: {e}"
                        ))
                        .into_http())));
                    }
                }
            }
        };
        request.extensions_mut().insert(caller);
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plaintext_from(addr: &str) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: "127.0.0.1:50051".parse().ok(),
            remote_addr: addr.parse().ok(),
        });
        request.extensions_mut().insert(Caller::Plaintext);
        request
    }

    #[test]
    fn secrets_go_over_mutual_tls_or_to_loopback_only() {
        // Addresses here are data: nothing connects to them.
        for loopback in [
            "127.0.0.1:40000",
            "127.9.9.9:1",
            "[::1]:2",
            "[::ffff:127.0.0.1]:3",
        ] {
            assert!(
                may_receive_secrets(&plaintext_from(loopback)),
                "{loopback} is this host"
            );
        }
        for remote in [
            "10.0.0.7:40000",
            "192.0.2.1:1",
            "[2001:db8::1]:2",
            "[::ffff:10.0.0.7]:3",
        ] {
            assert!(
                !may_receive_secrets(&plaintext_from(remote)),
                "plaintext to {remote} must not carry secrets"
            );
        }
        // No address known: not to be trusted either.
        let mut unknown = tonic::Request::new(());
        unknown.extensions_mut().insert(Caller::Plaintext);
        assert!(!may_receive_secrets(&unknown));

        let mut tls = plaintext_from("10.0.0.7:40000");
        tls.extensions_mut().insert(Caller::Tls(Identity {
            role: Role::Speaker { node: "n1".into() },
            san: "spiffe://herald.local/herald/speaker/node/n1".into(),
        }));
        assert!(may_receive_secrets(&tls));
    }

    /// README's table, method by method: every RPC of both services, read from the
    /// descriptors (so a new RPC fails here until it is given its roles), and exactly the
    /// roles that may call it.
    #[test]
    fn every_rpc_has_exactly_the_roles_the_readme_gives_it() {
        use prost::Message;
        const W: u8 = 1;
        const O: u8 = 2;
        const R: u8 = 4;
        const S: u8 = 8;
        let table: std::collections::BTreeMap<&str, u8> = [
            ("herald.ipam.v1.Ipam/CreatePool", W | O),
            ("herald.ipam.v1.Ipam/UpdatePool", W | O),
            ("herald.ipam.v1.Ipam/DeletePool", W | O),
            ("herald.ipam.v1.Ipam/GetPool", W | O | R),
            ("herald.ipam.v1.Ipam/ListPools", W | O | R),
            ("herald.ipam.v1.Ipam/Allocate", W),
            ("herald.ipam.v1.Ipam/AllocateBatch", W),
            ("herald.ipam.v1.Ipam/Release", W),
            ("herald.ipam.v1.Ipam/GetAllocation", W | O | R),
            ("herald.ipam.v1.Ipam/ListAllocations", W | O | R),
            ("herald.ipam.v1.Ipam/History", W | O | R),
            ("herald.ipam.v1.Ipam/Watch", W | O | R),
            ("herald.routing.v1.Routing/UpsertNode", W),
            ("herald.routing.v1.Routing/DeleteNode", W),
            ("herald.routing.v1.Routing/SetServiceEndpoints", W),
            ("herald.routing.v1.Routing/SetServiceEndpointsBatch", W),
            ("herald.routing.v1.Routing/ListNodes", W | O | R),
            ("herald.routing.v1.Routing/SetBgpPolicy", W | O),
            ("herald.routing.v1.Routing/GetBgpPolicy", W | O | R),
            (
                "herald.routing.v1.Routing/GetAdvertisementStatus",
                W | O | R,
            ),
            ("herald.routing.v1.Routing/WatchNodeRoutes", S),
            ("herald.routing.v1.Routing/ReportSpeakerState", S),
        ]
        .into();
        let roles = [
            (W, Role::Watcher),
            (O, Role::Operator),
            (R, Role::Reader),
            (S, Role::Speaker { node: "n1".into() }),
        ];
        let set = prost_types::FileDescriptorSet::decode(herald_api::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut seen = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("{}.{}/{}", file.package(), service.name(), method.name());
                    let Some(&who) = table.get(path.as_str()) else {
                        panic!("{path} is not in the table: decide which roles may call it");
                    };
                    seen += 1;
                    for (bit, role) in &roles {
                        assert_eq!(
                            allowed(role, &format!("/{path}")),
                            who & bit != 0,
                            "{role:?} on {path}"
                        );
                    }
                }
            }
        }
        assert_eq!(
            seen,
            table.len(),
            "the table names an RPC that does not exist"
        );
    }

    #[test]
    fn each_role_reaches_only_its_methods() {
        let speaker = Role::Speaker { node: "n1".into() };
        let all = [
            Role::Watcher,
            Role::Operator,
            Role::Reader,
            speaker.clone(),
            Role::AnySpeaker,
        ];
        let only = |path: &str, who: &[Role]| {
            for role in &all {
                assert_eq!(
                    allowed(role, path),
                    who.contains(role),
                    "{role:?} on {path}"
                );
            }
        };
        only("/herald.ipam.v1.Ipam/Allocate", &[Role::Watcher]);
        only("/herald.ipam.v1.Ipam/Release", &[Role::Watcher]);
        only(
            "/herald.ipam.v1.Ipam/DeletePool",
            &[Role::Operator, Role::Watcher],
        );
        only(
            "/herald.ipam.v1.Ipam/UpdatePool",
            &[Role::Operator, Role::Watcher],
        );
        only(
            "/herald.ipam.v1.Ipam/CreatePool",
            &[Role::Operator, Role::Watcher],
        );
        only(
            "/herald.ipam.v1.Ipam/ListAllocations",
            &[Role::Watcher, Role::Operator, Role::Reader],
        );
        only(
            "/herald.routing.v1.Routing/GetBgpPolicy",
            &[Role::Watcher, Role::Operator, Role::Reader],
        );
        only(
            "/herald.routing.v1.Routing/SetBgpPolicy",
            &[Role::Operator, Role::Watcher],
        );
        only("/herald.routing.v1.Routing/UpsertNode", &[Role::Watcher]);
        only(
            "/herald.routing.v1.Routing/WatchNodeRoutes",
            &[speaker.clone(), Role::AnySpeaker],
        );
        only(
            "/herald.routing.v1.Routing/ReportSpeakerState",
            &[speaker.clone(), Role::AnySpeaker],
        );
        only("/grpc.health.v1.Health/Check", &all);
        only("/herald.ipam.v1.Ipam/NoSuchMethod", &[]);
        only("/other.Service/Allocate", &[]);
        only("nonsense", &[]);
    }
}
