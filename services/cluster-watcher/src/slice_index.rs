//! EndpointSlices by the Service they belong to, so that handling one Service reads its
//! own slices instead of scanning every slice in the cluster (which made a full resync
//! quadratic in the number of Services).
//!
//! It follows the EndpointSlice watch the way the reflector's store does: applied and
//! deleted slices change it at once, and a re-list builds a fresh index that replaces the
//! old one when the list is complete, so slices deleted while the watch was down vanish.

use std::collections::{BTreeSet, HashMap};

/// A slice or a Service: (namespace, name).
pub type NamespacedName = (String, String);

#[derive(Debug, Default)]
struct Map {
    by_service: HashMap<NamespacedName, BTreeSet<String>>,
    service_of: HashMap<NamespacedName, NamespacedName>,
}

impl Map {
    /// Returns the Service the slice belonged to before, if any.
    fn apply(
        &mut self,
        namespace: &str,
        slice: &str,
        service: Option<&str>,
    ) -> Option<NamespacedName> {
        let before = self.delete(namespace, slice);
        if let Some(service) = service {
            let key = (namespace.to_string(), service.to_string());
            self.by_service
                .entry(key.clone())
                .or_default()
                .insert(slice.to_string());
            self.service_of
                .insert((namespace.to_string(), slice.to_string()), key);
        }
        before
    }

    /// Returns the Service the slice belonged to, if any.
    fn delete(&mut self, namespace: &str, slice: &str) -> Option<NamespacedName> {
        let service = self
            .service_of
            .remove(&(namespace.to_string(), slice.to_string()))?;
        if let Some(slices) = self.by_service.get_mut(&service) {
            slices.remove(slice);
            if slices.is_empty() {
                self.by_service.remove(&service);
            }
        }
        Some(service)
    }
}

#[derive(Debug, Default)]
pub struct SliceIndex {
    current: Map,
    /// While a re-list runs: the index it is building.
    relisting: Option<Map>,
}

impl SliceIndex {
    /// A slice was created or changed; `service` is the Service its label names, if any.
    /// Returns the Service it belonged to before, which needs handling too when it differs.
    pub fn apply(
        &mut self,
        namespace: &str,
        slice: &str,
        service: Option<&str>,
    ) -> Option<NamespacedName> {
        self.current.apply(namespace, slice, service)
    }

    /// Returns the Service the slice belonged to, if any.
    pub fn delete(&mut self, namespace: &str, slice: &str) -> Option<NamespacedName> {
        self.current.delete(namespace, slice)
    }

    /// A re-list starts: what it lists replaces the index when it is done.
    pub fn relist_started(&mut self) {
        self.relisting = Some(Map::default());
    }

    /// One slice of the re-list.
    pub fn relisted(&mut self, namespace: &str, slice: &str, service: Option<&str>) {
        match self.relisting.as_mut() {
            Some(map) => map.apply(namespace, slice, service),
            None => self.current.apply(namespace, slice, service),
        };
    }

    pub fn relist_done(&mut self) {
        if let Some(map) = self.relisting.take() {
            self.current = map;
        }
    }

    /// The names of the slices of Service `name` in `namespace`.
    pub fn slices_of(&self, namespace: &str, name: &str) -> Vec<String> {
        self.current
            .by_service
            .get(&(namespace.to_string(), name.to_string()))
            .map(|slices| slices.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_applies_moves_and_deletes() {
        let mut index = SliceIndex::default();
        index.apply("default", "web-abc", Some("web"));
        index.apply("default", "web-def", Some("web"));
        index.apply("other", "web-xyz", Some("web"));
        index.apply("default", "orphan", None);
        assert_eq!(index.slices_of("default", "web"), ["web-abc", "web-def"]);
        assert_eq!(index.slices_of("other", "web"), ["web-xyz"]);

        // A slice whose label now names another Service leaves the first one.
        let before = index.apply("default", "web-def", Some("api"));
        assert_eq!(before, Some(("default".into(), "web".into())));
        assert_eq!(index.slices_of("default", "web"), ["web-abc"]);
        assert_eq!(index.slices_of("default", "api"), ["web-def"]);

        assert_eq!(
            index.delete("default", "web-abc"),
            Some(("default".into(), "web".into()))
        );
        assert_eq!(index.delete("default", "never-seen"), None);
        assert!(index.slices_of("default", "web").is_empty());
        // No empty entry is left behind for a Service without slices.
        assert!(
            !index
                .current
                .by_service
                .contains_key(&("default".into(), "web".into()))
        );
    }

    #[test]
    fn a_relist_drops_what_vanished_while_the_watch_was_down() {
        let mut index = SliceIndex::default();
        index.apply("default", "web-abc", Some("web"));
        index.apply("default", "web-gone", Some("web"));
        index.relist_started();
        index.relisted("default", "web-abc", Some("web"));
        // Until the list is complete, the old index still answers.
        assert_eq!(index.slices_of("default", "web"), ["web-abc", "web-gone"]);
        index.relist_done();
        assert_eq!(index.slices_of("default", "web"), ["web-abc"]);
    }
}
