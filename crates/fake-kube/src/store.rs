//! The in-memory object store: one resourceVersion counter for everything (as etcd has),
//! a change history that watches replay from, and the field owners server-side apply
//! checks conflicts against.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::resource::Resource;

/// How many changes a watch may fall behind before its stream is ended (the client then
/// resumes from its last resourceVersion).
pub(crate) const BROADCAST_CAPACITY: usize = 1 << 16;
/// History kept for watches to resume from; older changes are compacted away, as etcd does.
const MAX_HISTORY: usize = 200_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed change, as a watch delivers it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub resource: Resource,
    pub namespace: String,
    pub kind: ChangeType,
    pub object: Value,
}

type Key = (Resource, String, String);

#[derive(Debug, Default)]
struct Stored {
    object: Value,
    /// Field path → the field manager that last set it (server-side apply conflicts).
    owners: HashMap<String, String>,
}

/// How a patch body is to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// RFC 7386 JSON merge patch.
    Merge,
    /// Strategic merge patch, served as a JSON merge patch: lists are replaced, not merged
    /// by key. Enough for the objects and patches Herald sends.
    Strategic,
    /// Server-side apply (the body is JSON, which is YAML). Conflicts are detected per
    /// field against the manager that last set it; merging is that of a merge patch.
    Apply { force: bool },
    /// RFC 6902 JSON patch (kube-runtime's finalizer helper sends one, with `test`
    /// operations as preconditions).
    Json,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Everything; what the test API uses.
    All,
    /// The main resource: the status is kept as it was.
    Main,
    /// The `/status` subresource: only the status changes.
    Status,
}

#[derive(Debug)]
pub(crate) struct Store {
    /// What the server answers: the built-in resources and every version of every
    /// CustomResourceDefinition created.
    served: Vec<Resource>,
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    history: Vec<Change>,
    /// A watch from a resourceVersion older than this gets 410 Gone.
    oldest_rv: u64,
    tx: broadcast::Sender<Arc<Change>>,
}

impl Store {
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            served: crate::resource::ALL.to_vec(),
            rv: 1,
            objects: BTreeMap::new(),
            history: Vec::new(),
            oldest_rv: 1,
            tx,
        }
    }

    pub(crate) fn served(&self) -> &[Resource] {
        &self.served
    }

    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    pub(crate) fn oldest_rv(&self) -> u64 {
        self.oldest_rv
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Forgets every change so far: a watch from any resourceVersion handed out until now
    /// gets 410. The version moves on by one so that this holds even for a client whose
    /// last bookmark carried the current one, which could otherwise resume without
    /// noticing the compaction.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.rv += 1;
        self.oldest_rv = self.rv;
    }

    /// Changes of `resource` in `namespace` (all when `None`) after `rv`.
    pub(crate) fn changes_after(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        rv: u64,
    ) -> Vec<Change> {
        let start = self.history.partition_point(|c| c.rv <= rv);
        self.history[start..]
            .iter()
            .filter(|c| {
                c.resource == resource.storage() && namespace.is_none_or(|ns| c.namespace == ns)
            })
            .cloned()
            .collect()
    }

    pub(crate) fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource.storage(), namespace.to_string(), name.to_string()))
            .map(|s| &s.object)
    }

    pub(crate) fn list(&self, resource: Resource, namespace: Option<&str>) -> Vec<Value> {
        self.of(resource, namespace).cloned().collect()
    }

    pub(crate) fn count(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        pred: impl Fn(&Value) -> bool,
    ) -> usize {
        self.of(resource, namespace).filter(|o| pred(o)).count()
    }

    fn of<'a>(
        &'a self,
        resource: Resource,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |((r, ns, _), _)| {
                *r == resource.storage() && namespace.is_none_or(|want| ns == want)
            })
            .map(|(_, s)| &s.object)
    }

    fn commit(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
        kind: ChangeType,
        mut object: Value,
    ) -> Value {
        self.rv += 1;
        set_path(
            &mut object,
            &["metadata", "resourceVersion"],
            json!(self.rv.to_string()),
        );
        let key = (resource.storage(), namespace.to_string(), name.to_string());
        if resource == crate::resource::CUSTOM_RESOURCE_DEFINITIONS {
            self.register(kind, &object);
        }
        match kind {
            ChangeType::Deleted => {
                self.objects.remove(&key);
            }
            ChangeType::Added | ChangeType::Modified => {
                self.objects.entry(key).or_default().object = object.clone();
            }
        }
        let change = Change {
            rv: self.rv,
            resource: resource.storage(),
            namespace: namespace.to_string(),
            kind,
            object: object.clone(),
        };
        self.history.push(change.clone());
        if self.history.len() > MAX_HISTORY {
            let drop = self.history.len() - MAX_HISTORY / 2;
            self.oldest_rv = self.history[drop - 1].rv;
            self.history.drain(..drop);
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Arc::new(change));
        object
    }

    /// A CustomResourceDefinition created, changed or deleted changes what is served.
    fn register(&mut self, kind: ChangeType, crd: &Value) {
        let Some(resources) = crate::resource::from_definition(crd) else {
            return;
        };
        let same_kind = |r: &Resource| {
            resources
                .iter()
                .any(|n| n.group == r.group && n.plural == r.plural)
        };
        self.served.retain(|r| !same_kind(r));
        if kind != ChangeType::Deleted {
            self.served.extend(resources);
        }
    }

    /// Creates `object`; `namespace` overrides the object's own for namespaced resources.
    pub(crate) fn create(
        &mut self,
        resource: Resource,
        namespace: Option<&str>,
        mut object: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        let namespace = if resource.namespaced {
            match namespace
                .map(str::to_string)
                .or_else(|| str_at(&object, &["metadata", "namespace"]))
            {
                Some(ns) if !ns.is_empty() => ns,
                _ => {
                    return Err(ApiError::bad_request(
                        "a namespaced object needs metadata.namespace",
                    ));
                }
            }
        } else {
            String::new()
        };
        let name = match str_at(&object, &["metadata", "name"]).filter(|n| !n.is_empty()) {
            Some(name) => name,
            None => match str_at(&object, &["metadata", "generateName"]) {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(ApiError::bad_request(
                        "metadata.name or metadata.generateName is required",
                    ));
                }
            },
        };
        if self.get(resource, &namespace, &name).is_some() {
            return Err(ApiError::already_exists(resource, &name));
        }
        set_path(&mut object, &["apiVersion"], json!(resource.api_version()));
        set_path(&mut object, &["kind"], json!(resource.kind));
        set_path(&mut object, &["metadata", "name"], json!(name));
        if resource.namespaced {
            set_path(&mut object, &["metadata", "namespace"], json!(namespace));
        } else if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("namespace");
        }
        set_path(&mut object, &["metadata", "uid"], json!(new_uid()));
        set_path(&mut object, &["metadata", "generation"], json!(1));
        if part == Part::Main
            && resource.has_status
            && let Some(map) = object.as_object_mut()
        {
            map.remove("status");
        }
        Ok(self.commit(resource, &namespace, &name, ChangeType::Added, object))
    }

    /// Replaces an object (PUT). A non-empty `metadata.resourceVersion` must match.
    pub(crate) fn update(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
        mut object: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.get(resource, namespace, name).cloned() else {
            return Err(ApiError::not_found(resource, name));
        };
        check_precondition(resource, name, &old, &object)?;
        let new = match part {
            Part::Status => {
                let mut new = old.clone();
                set_path(
                    &mut new,
                    &["status"],
                    object.get("status").cloned().unwrap_or(json!({})),
                );
                new
            }
            Part::Main | Part::All => {
                keep_identity(&old, &mut object, resource);
                if part == Part::Main && resource.has_status {
                    match old.get("status") {
                        Some(status) => set_path(&mut object, &["status"], status.clone()),
                        None => {
                            if let Some(map) = object.as_object_mut() {
                                map.remove("status");
                            }
                        }
                    }
                }
                object
            }
        };
        Ok(self.write_if_changed(resource, namespace, name, &old, new))
    }

    // Each argument is one part of the HTTP request; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
        patch: &Value,
        kind: PatchKind,
        part: Part,
        manager: &str,
    ) -> Result<Value, ApiError> {
        if kind == PatchKind::Json {
            return self.json_patch(resource, namespace, name, patch, part);
        }
        if !patch.is_object() {
            return Err(ApiError::bad_request("the patch is not a JSON object"));
        }
        let mut patch = patch.clone();
        // Only the part the endpoint may change is applied.
        if let Some(map) = patch.as_object_mut() {
            match part {
                Part::Status => map.retain(|k, _| k == "status" || k == "metadata"),
                Part::Main if resource.has_status => {
                    map.remove("status");
                }
                _ => {}
            }
            if part == Part::Status
                && let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut)
            {
                meta.retain(|k, _| k == "resourceVersion");
            }
        }
        let old = match self.get(resource, namespace, name).cloned() {
            Some(old) => old,
            None if matches!(kind, PatchKind::Apply { .. }) => {
                // Server-side apply creates what does not exist.
                let created = self.create(resource, Some(namespace), patch.clone(), part)?;
                self.record_owners(resource, namespace, name, &patch, manager);
                return Ok(created);
            }
            None => return Err(ApiError::not_found(resource, name)),
        };
        check_precondition(resource, name, &old, &patch)?;
        if let PatchKind::Apply { force: false } = kind {
            let owners = self
                .objects
                .get(&(resource.storage(), namespace.to_string(), name.to_string()))
                .map(|s| &s.owners);
            let mut conflicts = Vec::new();
            for (path, value) in leaves(&patch) {
                if path == "apiVersion" || path == "kind" || path.starts_with("metadata.") {
                    continue;
                }
                let current = lookup(&old, &path);
                let differs = current.is_some_and(|c| !c.is_null() && c != &value);
                let owner = owners.and_then(|o| o.get(&path));
                if differs && owner.is_none_or(|o| o != manager) {
                    conflicts.push(format!(
                        "{path} (managed by {})",
                        owner.map_or("an earlier writer", String::as_str)
                    ));
                }
            }
            if !conflicts.is_empty() {
                return Err(ApiError::conflict(format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join(", ")
                )));
            }
        }
        let mut new = old.clone();
        if let Some(map) = patch.as_object_mut()
            && let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut)
        {
            meta.remove("resourceVersion");
        }
        merge_patch(&mut new, &patch);
        keep_identity(&old, &mut new, resource);
        self.record_owners(resource, namespace, name, &patch, manager);
        Ok(self.write_if_changed(resource, namespace, name, &old, new))
    }

    fn json_patch(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
        patch: &Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let operations: json_patch::Patch = serde_json::from_value(patch.clone())
            .map_err(|e| ApiError::bad_request(format!("the JSON patch does not parse: {e}")))?;
        let Some(old) = self.get(resource, namespace, name).cloned() else {
            return Err(ApiError::not_found(resource, name));
        };
        // As the real server's JSON patch library: a `test` for null passes on a path that
        // does not exist (kube-runtime adds the first finalizer so).
        let operations = json_patch::Patch(
            operations
                .0
                .into_iter()
                .filter(|op| match op {
                    json_patch::PatchOperation::Test(t) => {
                        !(t.value.is_null() && old.pointer(t.path.as_str()).is_none())
                    }
                    _ => true,
                })
                .collect(),
        );
        let mut new = old.clone();
        json_patch::patch(&mut new, &operations).map_err(|e| ApiError::invalid(e.to_string()))?;
        match part {
            Part::Status => {
                let status = new.get("status").cloned().unwrap_or(json!({}));
                new = old.clone();
                set_path(&mut new, &["status"], status);
            }
            Part::Main if resource.has_status => match old.get("status") {
                Some(status) => set_path(&mut new, &["status"], status.clone()),
                None => {
                    if let Some(map) = new.as_object_mut() {
                        map.remove("status");
                    }
                }
            },
            _ => {}
        }
        keep_identity(&old, &mut new, resource);
        Ok(self.write_if_changed(resource, namespace, name, &old, new))
    }

    /// An object with finalizers is only marked (`deletionTimestamp`); it goes when a
    /// write leaves it with none.
    pub(crate) fn delete(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.get(resource, namespace, name).cloned() else {
            return Err(ApiError::not_found(resource, name));
        };
        if has_finalizers(&old) {
            if old["metadata"]["deletionTimestamp"].is_string() {
                return Ok(old);
            }
            let mut marked = old;
            set_path(
                &mut marked,
                &["metadata", "deletionTimestamp"],
                json!(now_rfc3339()),
            );
            return Ok(self.commit(resource, namespace, name, ChangeType::Modified, marked));
        }
        Ok(self.commit(resource, namespace, name, ChangeType::Deleted, old))
    }

    fn record_owners(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
        patch: &Value,
        manager: &str,
    ) {
        let Some(stored) =
            self.objects
                .get_mut(&(resource.storage(), namespace.to_string(), name.to_string()))
        else {
            return;
        };
        for (path, value) in leaves(patch) {
            if value.is_null() {
                stored.owners.remove(&path);
            } else {
                stored.owners.insert(path, manager.to_string());
            }
        }
    }

    /// A write that changes nothing is not a change: no new resourceVersion, no event.
    fn write_if_changed(
        &mut self,
        resource: Resource,
        namespace: &str,
        name: &str,
        old: &Value,
        mut new: Value,
    ) -> Value {
        set_path(
            &mut new,
            &["metadata", "resourceVersion"],
            old["metadata"]["resourceVersion"].clone(),
        );
        if &new == old {
            return new;
        }
        if new.get("spec") != old.get("spec") {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            set_path(&mut new, &["metadata", "generation"], json!(generation));
        }
        // The last finalizer removed from an object being deleted deletes it.
        if new["metadata"]["deletionTimestamp"].is_string() && !has_finalizers(&new) {
            return self.commit(resource, namespace, name, ChangeType::Deleted, new);
        }
        self.commit(resource, namespace, name, ChangeType::Modified, new)
    }
}

/// `metadata.resourceVersion` in a write is an optimistic-concurrency precondition.
fn check_precondition(
    resource: Resource,
    name: &str,
    old: &Value,
    body: &Value,
) -> Result<(), ApiError> {
    match str_at(body, &["metadata", "resourceVersion"]) {
        Some(want)
            if !want.is_empty()
                && Some(&want) != str_at(old, &["metadata", "resourceVersion"]).as_ref() =>
        {
            Err(ApiError::conflict(format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                resource.plural
            )))
        }
        _ => Ok(()),
    }
}

/// Fields a client cannot change.
fn keep_identity(old: &Value, new: &mut Value, resource: Resource) {
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "generation",
        "deletionTimestamp",
    ] {
        match old["metadata"].get(field) {
            Some(v) => set_path(new, &["metadata", field], v.clone()),
            None => {
                if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove(field);
                }
            }
        }
    }
    set_path(new, &["apiVersion"], json!(resource.api_version()));
    set_path(new, &["kind"], json!(resource.kind));
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Every non-object value in `value` with its dotted path.
fn leaves(value: &Value) -> Vec<(String, Value)> {
    fn walk(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}

fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

pub(crate) fn str_at(value: &Value, path: &[&str]) -> Option<String> {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(Value::as_str)
        .map(str::to_string)
}

pub(crate) fn set_path(value: &mut Value, path: &[&str], new: Value) {
    let mut cur = value;
    for key in path {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(map) = cur else { return };
        cur = map.entry(key.to_string()).or_insert(Value::Null);
    }
    *cur = new;
}

fn has_finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// Now in RFC 3339, seconds precision, as metav1.Time is written.
fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::resource::{LEASES, SERVICES};

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn writes_bump_the_resource_version_and_no_ops_do_not() {
        let mut store = Store::new();
        let svc = json!({"metadata": {"name": "web"}, "spec": {"type": "LoadBalancer"}});
        let created = store
            .create(SERVICES, Some("default"), svc, Part::All)
            .unwrap();
        let rv1 = str_at(&created, &["metadata", "resourceVersion"]).unwrap();
        let same = store
            .patch(
                SERVICES,
                "default",
                "web",
                &json!({"spec": {"type": "LoadBalancer"}}),
                PatchKind::Merge,
                Part::Main,
                "t",
            )
            .unwrap();
        assert_eq!(
            str_at(&same, &["metadata", "resourceVersion"]).unwrap(),
            rv1
        );
        let status = store
            .patch(
                SERVICES,
                "default",
                "web",
                &json!({"spec": {"type": "ClusterIP"}, "status": {"x": 1}}),
                PatchKind::Merge,
                Part::Status,
                "t",
            )
            .unwrap();
        assert_eq!(
            status["spec"]["type"], "LoadBalancer",
            "a status patch leaves the spec alone"
        );
        assert_eq!(status["status"]["x"], 1);
        assert_ne!(
            str_at(&status, &["metadata", "resourceVersion"]).unwrap(),
            rv1
        );
        let stale = store.patch(
            SERVICES,
            "default",
            "web",
            &json!({"metadata": {"resourceVersion": rv1}, "status": {"x": 2}}),
            PatchKind::Merge,
            Part::Status,
            "t",
        );
        assert_eq!(stale.unwrap_err().code, 409);
    }

    #[test]
    fn apply_conflicts_with_another_managers_field() {
        let mut store = Store::new();
        store
            .create(
                LEASES,
                Some("ns"),
                json!({"metadata": {"name": "l"}, "spec": {}}),
                Part::All,
            )
            .unwrap();
        let apply = |holder: &str| json!({"spec": {"holderIdentity": holder}});
        store
            .patch(
                LEASES,
                "ns",
                "l",
                &apply("a"),
                PatchKind::Apply { force: false },
                Part::Main,
                "a",
            )
            .unwrap();
        let err = store
            .patch(
                LEASES,
                "ns",
                "l",
                &apply("b"),
                PatchKind::Apply { force: false },
                Part::Main,
                "b",
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
        // Once the holder is cleared, b may take it.
        store
            .patch(
                LEASES,
                "ns",
                "l",
                &json!({"spec": {"holderIdentity": null}}),
                PatchKind::Strategic,
                Part::Main,
                "b",
            )
            .unwrap();
        store
            .patch(
                LEASES,
                "ns",
                "l",
                &apply("b"),
                PatchKind::Apply { force: false },
                Part::Main,
                "b",
            )
            .unwrap();
        assert_eq!(
            store.get(LEASES, "ns", "l").unwrap()["spec"]["holderIdentity"],
            "b"
        );
    }
}
