//! The HTTP side: one handler that routes by path and verb, and the watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::Shared;
use crate::error::ApiError;
use crate::resource::{Resource, Target, parse_path};
use crate::store::{Change, Part, PatchKind};

/// Largest request body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How often an idle watch that asked for bookmarks gets one.
pub(crate) const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);
/// A watch without `timeoutSeconds` ends after this long, as the real server's default.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The verb a request is counted under (the names of Kubernetes' RBAC verbs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    List,
    Watch,
    Get,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    /// As RBAC spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Watch => "watch",
            Self::Get => "get",
            Self::Create => "create",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
        }
    }
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub verb: Verb,
    pub resource: &'static str,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    /// The Content-Type of a patch.
    pub content_type: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

pub(crate) async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let parsed = parse_path(shared.lock().served(), parts.uri.path());
    let Some(target) = parsed else {
        let err = ApiError {
            code: 404,
            reason: "NotFound".into(),
            message: format!("the fake API server does not serve {}", parts.uri.path()),
        };
        return error_response(&err);
    };
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(e) => return error_response(&ApiError::bad_request(format!("read body: {e}"))),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let verb = match (&parts.method, &target.name) {
        (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            Verb::Watch
        }
        (&Method::GET, None) => Verb::List,
        (&Method::GET, Some(_)) => Verb::Get,
        (&Method::POST, None) => Verb::Create,
        (&Method::PUT, Some(_)) => Verb::Update,
        (&Method::PATCH, Some(_)) => Verb::Patch,
        (&Method::DELETE, Some(_)) => Verb::Delete,
        (method, _) => {
            return error_response(&ApiError::method_not_allowed(format!(
                "{method} is not served on {}",
                parts.uri.path()
            )));
        }
    };
    let write = matches!(
        verb,
        Verb::Create | Verb::Update | Verb::Patch | Verb::Delete
    )
    .then(|| shared.start_write());
    if write.is_some() {
        let delay = shared.write_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
    let response = if shared.denied(verb, target.resource) {
        error_response(&ApiError::forbidden(verb, target.resource))
    } else if verb == Verb::Watch {
        watch(&shared, &target, &query)
    } else {
        match serve(&shared, verb, &target, &query, &parts.headers, &body) {
            Ok(mut value) => {
                in_version(&mut value, target.resource);
                json_response(StatusCode::OK, &value)
            }
            Err(err) => error_response(&err),
        }
    };
    shared.record(RequestRecord {
        verb,
        resource: target.resource.plural,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        subresource: target.subresource.clone(),
        content_type: if verb == Verb::Patch {
            content_type
        } else {
            None
        },
        status: response.status().as_u16(),
    });
    response
}

fn serve(
    shared: &Shared,
    verb: Verb,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Value, ApiError> {
    let resource = target.resource;
    let namespace = target.namespace.clone().unwrap_or_default();
    let name = target.name.clone().unwrap_or_default();
    let part = match target.subresource.as_deref() {
        None => Part::Main,
        Some("status") if resource.has_status => Part::Status,
        Some(other) => {
            return Err(ApiError {
                code: 404,
                reason: "NotFound".into(),
                message: format!("{} has no subresource {other:?}", resource.plural),
            });
        }
    };
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
    };
    let mut store = shared.lock();
    match verb {
        Verb::List => {
            let selector = query.get("labelSelector").map(String::as_str).unwrap_or("");
            let items: Vec<Value> = store
                .list(resource, target.namespace.as_deref())
                .into_iter()
                .filter(|o| matches_labels(o, selector))
                .collect();
            Ok(json!({
                "apiVersion": resource.api_version(),
                "kind": format!("{}List", resource.kind),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": items,
            }))
        }
        Verb::Get => store
            .get(resource, &namespace, &name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, &name)),
        Verb::Create => store.create(
            resource,
            target.namespace.as_deref(),
            parse_body()?,
            Part::Main,
        ),
        Verb::Update => store.update(resource, &namespace, &name, parse_body()?, part),
        Verb::Patch => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = match content_type.split(';').next().unwrap_or("").trim() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/json-patch+json" => PatchKind::Json,
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    PatchKind::Apply {
                        force: query.get("force").is_some_and(|f| f == "true"),
                    }
                }
                other => {
                    return Err(ApiError::unsupported_media_type(format!(
                        "the fake API server does not serve patches of type {other:?}"
                    )));
                }
            };
            let manager = query
                .get("fieldManager")
                .map(String::as_str)
                .unwrap_or("unknown");
            store.patch(
                resource,
                &namespace,
                &name,
                &parse_body()?,
                kind,
                part,
                manager,
            )
        }
        Verb::Delete => store.delete(resource, &namespace, &name),
        Verb::Watch => Err(ApiError::bad_request("watch is served elsewhere")),
    }
}

/// `a=b,c!=d,e,!f` label selectors (no set-based ones).
pub(crate) fn matches_labels(object: &Value, selector: &str) -> bool {
    let labels = &object["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).and_then(Value::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                let k = k.trim().trim_end_matches('=');
                labels.get(k).and_then(Value::as_str) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels.get(k.trim()).is_none()
            } else {
                labels.get(term).is_some()
            }
        })
}

fn watch(shared: &Arc<Shared>, target: &Target, query: &HashMap<String, String>) -> Response {
    let resource = target.resource;
    let namespace = target.namespace.clone();
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let from = query.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1024);

    // Everything up to the subscription is read under one lock, so no change is missed or
    // sent twice.
    let (initial, mut live, mut last_rv, mut expire) = {
        let store = shared.lock();
        let current = store.resource_version();
        let initial: Result<Vec<Value>, ApiError> = if from.is_empty() || from == "0" {
            Ok(store
                .list(resource, namespace.as_deref())
                .into_iter()
                .map(|mut o| {
                    in_version(&mut o, resource);
                    json!({"type": "ADDED", "object": o})
                })
                .collect())
        } else {
            match from.parse::<u64>() {
                Ok(rv) if rv < store.oldest_rv() => Err(ApiError::gone(format!(
                    "too old resource version: {rv} ({})",
                    store.oldest_rv()
                ))),
                Ok(rv) => Ok(store
                    .changes_after(resource, namespace.as_deref(), rv)
                    .iter()
                    .map(|c| change_event(c, resource))
                    .collect()),
                Err(_) => Err(ApiError::bad_request(format!(
                    "resourceVersion {from:?} is not a number"
                ))),
            }
        };
        (
            initial,
            store.subscribe(),
            current,
            shared.expire.subscribe(),
        )
    };
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _open = shared.open_watch();
        let send = |event: &Value| {
            let mut line = serde_json::to_vec(event).unwrap_or_default();
            line.push(b'\n');
            tx.send(Ok(Bytes::from(line)))
        };
        let events = match initial {
            Ok(events) => events,
            Err(err) => {
                let _ = send(&json!({"type": "ERROR", "object": err.to_status()})).await;
                return;
            }
        };
        for event in &events {
            if let Some(v) = matches_event(event, &selector)
                && send(v).await.is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                // Expiry first: changes made after an expiry must not slip out through
                // the watch it ended, which a random pick among ready branches allowed.
                biased;
                _ = expire.changed() => {
                    let err = ApiError::gone(format!("too old resource version: {last_rv} (compacted)"));
                    let _ = send(&json!({"type": "ERROR", "object": err.to_status()})).await;
                    return;
                }
                () = &mut deadline => return,
                change = live.recv() => match change {
                    Ok(change) => {
                        last_rv = last_rv.max(change.rv);
                        if change.resource != resource.storage()
                            || namespace.as_ref().is_some_and(|ns| *ns != change.namespace)
                        {
                            continue;
                        }
                        let event = change_event(&change, resource);
                        if let Some(v) = matches_event(&event, &selector)
                            && send(v).await.is_err()
                        {
                            return;
                        }
                    }
                    // Fell behind, or the server stopped: end the stream and let the
                    // client resume from its last resourceVersion.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let bookmark = json!({
                        "type": "BOOKMARK",
                        "object": {
                            "apiVersion": resource.api_version(),
                            "kind": resource.kind,
                            "metadata": {"resourceVersion": last_rv.to_string()},
                        },
                    });
                    if send(&bookmark).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn matches_event<'a>(event: &'a Value, selector: &str) -> Option<&'a Value> {
    matches_labels(&event["object"], selector).then_some(event)
}

fn change_event(change: &Change, resource: Resource) -> Value {
    let mut object = change.object.clone();
    in_version(&mut object, resource);
    json!({"type": change.kind.as_str(), "object": object})
}

/// Objects are stored once for all the versions of their kind and answered in the one
/// asked for (the fake's conversion is a relabelling: Herald reads fields common to the
/// versions it serves).
fn in_version(value: &mut Value, resource: Resource) {
    let label = |object: &mut Value| {
        if let Some(map) = object.as_object_mut() {
            map.insert("apiVersion".into(), json!(resource.api_version()));
            map.insert("kind".into(), json!(resource.kind));
        }
    };
    match value.get_mut("items").and_then(Value::as_array_mut) {
        Some(items) => items.iter_mut().for_each(label),
        None => label(value),
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn error_response(err: &ApiError) -> Response {
    let status = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &err.to_status())
}
