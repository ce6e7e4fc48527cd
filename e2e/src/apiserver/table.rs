//! `meta.k8s.io/v1` Table responses, which `kubectl get` asks for: a CRD's
//! additionalPrinterColumns (after NAME), or a few columns for built-ins.

use serde_json::{json, Value};

use super::types::ResourceType;

/// A JSONPath as printer columns use it: `.a.b`, `.a[0].b`, `.a[?(@.k=="v")].b`.
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('.');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inside = &r[..end];
            rest = r[end + 1..].trim_start_matches('.');
            if let Some(filter) = inside.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (k, v) = filter.split_once("==")?;
                let v = v.trim().trim_matches('"').trim_matches('\'');
                cur = cur
                    .as_array()?
                    .iter()
                    .find(|e| e.get(k.trim()).and_then(Value::as_str) == Some(v))?;
            } else {
                cur = cur.as_array()?.get(inside.parse::<usize>().ok()?)?;
            }
            continue;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        cur = cur.get(&rest[..end])?;
        rest = rest[end..].trim_start_matches('.');
    }
    Some(cur)
}

/// "5s", "3m", "2h", "4d", as kubectl prints ages.
pub fn human_age(timestamp: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 2 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn cell(v: Option<&Value>, type_: &str) -> Value {
    match (v, type_) {
        (None | Some(Value::Null), _) => json!("<none>"),
        (Some(Value::String(s)), "date") => json!(human_age(s)),
        (Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))), _) => v.clone(),
        (Some(other), _) => json!(other.to_string()),
    }
}

fn builtin_columns(t: &ResourceType) -> Vec<(&'static str, &'static str, &'static str)> {
    match t.kind.as_str() {
        "Pod" => vec![
            ("Status", "string", ".status.phase"),
            ("Node", "string", ".spec.nodeName"),
        ],
        "Node" => vec![("Status", "string", ".status.conditions[?(@.type==\"Ready\")].status")],
        "Job" => vec![("Succeeded", "integer", ".status.succeeded")],
        _ => vec![],
    }
}

pub fn to_table(t: &ResourceType, items: &[Value], resource_version: &str) -> Value {
    let mut columns: Vec<(String, String, String)> = if t.builtin {
        builtin_columns(t)
            .into_iter()
            .map(|(a, b, c)| (a.into(), b.into(), c.into()))
            .collect()
    } else {
        t.printer_columns
            .iter()
            .map(|c| (c.name.clone(), c.type_.clone(), c.json_path.clone()))
            .collect()
    };
    if t.builtin || columns.is_empty() {
        columns.push(("Age".into(), "date".into(), ".metadata.creationTimestamp".into()));
    }
    let mut defs = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    defs.extend(
        columns
            .iter()
            .map(|(n, ty, _)| json!({"name": n, "type": ty, "format": "", "description": "", "priority": 0})),
    );
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            cells.extend(columns.iter().map(|(name, ty, p)| {
                let c = cell(json_path(o, p), ty);
                if t.kind == "Node" && name == "Status" {
                    json!(if c == "True" { "Ready" } else { "NotReady" })
                } else {
                    c
                }
            }));
            json!({
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"].clone()}
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_of_printer_columns() {
        let o = json!({"status": {"phase": "Ready", "conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(json_path(&o, ".status.phase"), Some(&json!("Ready")));
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(json_path(&o, ".status.conditions[0].type"), Some(&json!("A")));
        assert_eq!(json_path(&o, ".status.missing"), None);
    }
}
