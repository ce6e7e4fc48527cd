//! core/v1 Events and events.k8s.io/v1 Events are one resource in the real
//! API server, seen through two schemas. The store keeps one object with both
//! sets of fields; a write through either API fills in the other's fields,
//! and reads are labelled with the API they came through.

use serde_json::{json, Value};

/// Fills the other API's fields from the ones written (`via_events_v1`: the
/// write came through events.k8s.io/v1).
pub fn normalize(obj: &mut Value, via_events_v1: bool) {
    let copy = |obj: &mut Value, from: &str, to: &str| {
        if let Some(v) = obj.get(from).cloned().filter(|v| !v.is_null()) {
            obj[to] = v;
        }
    };
    if via_events_v1 {
        copy(obj, "regarding", "involvedObject");
        copy(obj, "note", "message");
        copy(obj, "reportingController", "reportingComponent");
        if let Some(c) = obj["reportingController"].as_str().map(String::from) {
            obj["source"] = json!({"component": c});
        }
        let last = obj["series"]["lastObservedTime"].clone();
        let first = obj["eventTime"].clone();
        if !first.is_null() {
            obj["firstTimestamp"] =
                json!(first
                    .as_str()
                    .map(|t| t.split('.').next().unwrap_or(t).trim_end_matches('Z').to_string() + "Z"));
        }
        let last = if last.is_null() { first } else { last };
        if let Some(t) = last.as_str() {
            obj["lastTimestamp"] = json!(t.split('.').next().unwrap_or(t).trim_end_matches('Z').to_string() + "Z");
        }
        obj["count"] = json!(obj["series"]["count"].as_i64().unwrap_or(1));
    } else {
        copy(obj, "involvedObject", "regarding");
        copy(obj, "message", "note");
        copy(obj, "reportingComponent", "reportingController");
        if obj["reportingController"].is_null() {
            if let Some(c) = obj["source"]["component"].as_str().map(String::from) {
                obj["reportingController"] = json!(c);
            }
        }
        copy(obj, "count", "deprecatedCount");
        copy(obj, "firstTimestamp", "deprecatedFirstTimestamp");
        copy(obj, "lastTimestamp", "deprecatedLastTimestamp");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_event_reads_as_a_core_event_and_back() {
        let mut e = json!({"regarding": {"kind": "ModelWrapper", "name": "bert", "uid": "u"}, "note": "Filling -> Ready",
            "reason": "Ready", "type": "Normal", "reportingController": "zerocopy-operator",
            "eventTime": "2026-11-26T18:00:00.123456Z"});
        normalize(&mut e, true);
        assert_eq!(e["involvedObject"]["name"], "bert");
        assert_eq!(e["message"], "Filling -> Ready");
        assert_eq!(e["source"]["component"], "zerocopy-operator");
        assert_eq!(e["firstTimestamp"], "2026-11-26T18:00:00Z");
        let mut c =
            json!({"involvedObject": {"name": "p"}, "message": "m", "source": {"component": "kubelet"}, "count": 3});
        normalize(&mut c, false);
        assert_eq!(
            (c["regarding"]["name"].clone(), c["note"].clone()),
            (json!("p"), json!("m"))
        );
        assert_eq!(
            (c["reportingController"].clone(), c["deprecatedCount"].clone()),
            (json!("kubelet"), json!(3))
        );
    }
}
