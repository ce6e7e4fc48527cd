//! core/v1 Events recorded by the simulator's own components, deduplicated
//! by (object, reason, message) with a count, as client-go's recorder does.

use serde_json::{json, Value};

use crate::apiserver::selector::FieldSelector;
use crate::apiserver::store::{now, ListOptions, Store, Sub};

/// Records (or bumps the count of) an Event about `object`.
pub fn record(store: &Store, object: &Value, type_: &str, reason: &str, message: &str, component: &str) {
    let Ok(t) = store.resource_type("", "events") else {
        return;
    };
    let ns = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let uid = object["metadata"]["uid"].as_str().unwrap_or("");
    let opts = ListOptions {
        fields: FieldSelector::parse(&format!("involvedObject.uid={uid},reason={reason}")).unwrap_or_default(),
        ..Default::default()
    };
    if let Ok((existing, _, _)) = store.list(&t, Some(&ns), &opts) {
        if let Some(e) = existing.iter().find(|e| e["message"] == message) {
            let name = e["metadata"]["name"].as_str().unwrap_or("").to_string();
            let _ = store.modify(&t, &ns, &name, Sub::Main, |e| {
                e["count"] = json!(e["count"].as_i64().unwrap_or(1) + 1);
                e["lastTimestamp"] = json!(now());
            });
            return;
        }
    }
    let name = object["metadata"]["name"].as_str().unwrap_or("object");
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": format!("{name}."), "namespace": ns},
        "involvedObject": {
            "apiVersion": object["apiVersion"], "kind": object["kind"], "name": name,
            "namespace": object["metadata"]["namespace"], "uid": uid,
            "resourceVersion": object["metadata"]["resourceVersion"],
        },
        "type": type_,
        "reason": reason,
        "message": message,
        "count": 1,
        "firstTimestamp": now(),
        "lastTimestamp": now(),
        "source": {"component": component},
        "reportingComponent": component,
    });
    if let Err(e) = store.create(&t, &ns, event) {
        tracing::debug!(error = %e, "could not record event");
    }
}
