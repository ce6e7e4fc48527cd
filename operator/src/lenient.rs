//! `Lenient<K>`: a watched object whose body may not parse as `K`. A list or
//! watch of `K` fails as a whole when one object is malformed (left by an
//! older schema, or written with validation off); watching `Lenient<K>` keeps
//! every other object flowing, and the malformed one is reported on its own
//! status instead.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Lenient<K> {
    pub metadata: ObjectMeta,
    /// The object, or why it does not parse.
    pub parsed: Result<K, String>,
    raw: Value,
}

impl<K> Lenient<K> {
    pub fn get(&self) -> Option<&K> {
        self.parsed.as_ref().ok()
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(d)?;
        // Without readable metadata the object cannot even be named: that alone fails.
        let metadata: ObjectMeta =
            serde_json::from_value(raw.get("metadata").cloned().unwrap_or(Value::Null)).map_err(D::Error::custom)?;
        let parsed = serde_json::from_value::<K>(raw.clone()).map_err(|e| e.to_string());
        Ok(Lenient { metadata, parsed, raw })
    }
}

impl<K> Serialize for Lenient<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = self.raw.clone();
        v["metadata"] = serde_json::to_value(&self.metadata).map_err(serde::ser::Error::custom)?;
        v.serialize(s)
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy_api::ModelWrapper;

    #[test]
    fn one_malformed_item_does_not_fail_the_list() {
        let list = serde_json::json!([
            {"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper", "metadata": {"name": "good"},
             "spec": {"pipeline": {"components": [{"name": "m", "weights": {"uri": "file:///m"}}]}}},
            {"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper", "metadata": {"name": "bad"},
             "spec": {"pipeline": "oops"}}
        ]);
        let items: Vec<Lenient<ModelWrapper>> = serde_json::from_value(list).unwrap();
        assert!(items[0].get().is_some());
        let err = items[1].parsed.as_ref().unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        assert_eq!(serde_json::to_value(&items[1]).unwrap()["spec"]["pipeline"], "oops");
    }
}
