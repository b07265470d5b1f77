//! The resource types the fake serves, and how their URLs are spelled.

/// One Kubernetes resource type: where it lives in the URL space and how it behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// API group; empty for the core group (`/api/v1`).
    pub group: &'static str,
    pub version: &'static str,
    /// The URL segment, e.g. `services`.
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Whether `…/status` is a subresource. Writes to the main resource then keep the old
    /// status, and writes to `/status` change nothing but the status, as the real server does.
    pub has_status: bool,
}

impl Resource {
    /// The resource with its version left out: every served version of a custom resource
    /// reads and writes the same stored objects, as the real server keeps one stored
    /// version and converts.
    pub(crate) fn storage(self) -> Self {
        Self {
            version: "",
            has_status: false,
            ..self
        }
    }

    /// `v1` or `group/version`, as in an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub const SERVICES: Resource = Resource {
    group: "",
    version: "v1",
    plural: "services",
    kind: "Service",
    namespaced: true,
    has_status: true,
};

pub const ENDPOINT_SLICES: Resource = Resource {
    group: "discovery.k8s.io",
    version: "v1",
    plural: "endpointslices",
    kind: "EndpointSlice",
    namespaced: true,
    has_status: false,
};

pub const NODES: Resource = Resource {
    group: "",
    version: "v1",
    plural: "nodes",
    kind: "Node",
    namespaced: false,
    has_status: true,
};

pub const NAMESPACES: Resource = Resource {
    group: "",
    version: "v1",
    plural: "namespaces",
    kind: "Namespace",
    namespaced: false,
    has_status: true,
};

/// core/v1 Events (what `kubectl describe` shows).
pub const EVENTS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "events",
    kind: "Event",
    namespaced: true,
    has_status: false,
};

/// events.k8s.io/v1 Events (what kube-rs' `Recorder` writes).
pub const EVENTS_V1: Resource = Resource {
    group: "events.k8s.io",
    version: "v1",
    plural: "events",
    kind: "Event",
    namespaced: true,
    has_status: false,
};

pub const LEASES: Resource = Resource {
    group: "coordination.k8s.io",
    version: "v1",
    plural: "leases",
    kind: "Lease",
    namespaced: true,
    has_status: false,
};

pub const CONFIG_MAPS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "configmaps",
    kind: "ConfigMap",
    namespaced: true,
    has_status: false,
};

/// apiextensions.k8s.io/v1 CustomResourceDefinitions: creating one makes the fake serve
/// its kind in every version it lists (with `/status` where the version declares it).
pub const CUSTOM_RESOURCE_DEFINITIONS: Resource = Resource {
    group: "apiextensions.k8s.io",
    version: "v1",
    plural: "customresourcedefinitions",
    kind: "CustomResourceDefinition",
    namespaced: false,
    has_status: true,
};

/// core/v1 Secrets (BGP passwords are read from them).
pub const SECRETS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "secrets",
    kind: "Secret",
    namespaced: true,
    has_status: false,
};

/// The resources every fake serves from the start.
pub const ALL: &[Resource] = &[
    SERVICES,
    ENDPOINT_SLICES,
    NODES,
    NAMESPACES,
    EVENTS,
    EVENTS_V1,
    LEASES,
    CONFIG_MAPS,
    CUSTOM_RESOURCE_DEFINITIONS,
    SECRETS,
];

/// The resources a CustomResourceDefinition declares, one per served version; `None`
/// when it is not one the fake can serve (a name is leaked per registration, a few bytes
/// per test).
pub(crate) fn from_definition(crd: &serde_json::Value) -> Option<Vec<Resource>> {
    let spec = &crd["spec"];
    let leak = |v: &serde_json::Value| -> Option<&'static str> {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(|s| &*Box::leak(s.to_string().into_boxed_str()))
    };
    let group = leak(&spec["group"])?;
    let plural = leak(&spec["names"]["plural"])?;
    let kind = leak(&spec["names"]["kind"])?;
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let versions = spec["versions"].as_array()?;
    let resources: Vec<Resource> = versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .filter_map(|v| {
            Some(Resource {
                group,
                version: leak(&v["name"])?,
                plural,
                kind,
                namespaced,
                has_status: v["subresources"]["status"].is_object(),
            })
        })
        .collect();
    (!resources.is_empty()).then_some(resources)
}

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub resource: Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

fn find(served: &[Resource], group: &str, version: &str, plural: &str) -> Option<Resource> {
    served
        .iter()
        .copied()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Parses `/api/v1/…` and `/apis/{group}/{version}/…` paths naming one of `served`.
pub(crate) fn parse_path(served: &[Resource], path: &str) -> Option<Target> {
    let find = |group: &str, version: &str, plural: &str| find(served, group, version, plural);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let owned = |s: &&str| Some(s.to_string());
    match rest {
        // A namespaced resource: namespaces/{ns}/{plural}[/{name}[/{sub}]]
        ["namespaces", ns, plural, tail @ ..]
            if find(group, version, plural).is_some_and(|r| r.namespaced) =>
        {
            let resource = find(group, version, plural)?;
            let (name, subresource) = match tail {
                [] => (None, None),
                [name] => (owned(name), None),
                [name, sub] => (owned(name), owned(sub)),
                _ => return None,
            };
            Some(Target {
                resource,
                namespace: owned(ns),
                name,
                subresource,
            })
        }
        // A resource across all namespaces, or a cluster-scoped one.
        [plural, tail @ ..] => {
            let resource = find(group, version, plural)?;
            let (name, subresource) = match tail {
                [] => (None, None),
                [name] if !resource.namespaced => (owned(name), None),
                [name, sub] if !resource.namespaced => (owned(name), owned(sub)),
                _ => return None,
            };
            Some(Target {
                resource,
                namespace: None,
                name,
                subresource,
            })
        }
        [] => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Target {
        parse_path(ALL, path).unwrap_or_else(|| panic!("{path} does not parse"))
    }

    #[test]
    fn paths() {
        let t = target("/api/v1/namespaces/default/services/web/status");
        assert_eq!(t.resource, SERVICES);
        assert_eq!(t.namespace.as_deref(), Some("default"));
        assert_eq!(t.name.as_deref(), Some("web"));
        assert_eq!(t.subresource.as_deref(), Some("status"));

        let t = target("/api/v1/services");
        assert_eq!((t.resource, t.namespace, t.name), (SERVICES, None, None));

        let t = target("/api/v1/namespaces/default");
        assert_eq!(t.resource, NAMESPACES);
        assert_eq!(t.name.as_deref(), Some("default"));

        let t = target("/api/v1/namespaces");
        assert_eq!((t.resource, t.name), (NAMESPACES, None));

        let t = target("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/herald");
        assert_eq!(t.resource, LEASES);
        assert_eq!(t.name.as_deref(), Some("herald"));

        let t = target("/apis/discovery.k8s.io/v1/endpointslices");
        assert_eq!(t.resource, ENDPOINT_SLICES);

        let t = target("/api/v1/nodes/n1/status");
        assert_eq!(t.resource, NODES);
        assert_eq!(t.subresource.as_deref(), Some("status"));

        assert!(parse_path(ALL, "/api/v1/pods").is_none());
        assert!(parse_path(ALL, "/version").is_none());
        assert!(parse_path(ALL, "/api/v1/services/web").is_none());
    }
}
