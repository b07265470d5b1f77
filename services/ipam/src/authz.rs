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
            "UpsertNode" | "DeleteNode" | "SetServiceEndpoints" => matches!(role, Watcher),
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
