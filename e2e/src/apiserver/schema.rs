//! Validation of custom resources against their CRD's structural
//! `openAPIV3Schema`, and pruning of unknown fields, as the API server does.
//!
//! Checked: type, required, enum, pattern, minimum/maximum, minLength/maxLength,
//! minItems/maxItems, items, properties, additionalProperties,
//! `x-kubernetes-preserve-unknown-fields`, `x-kubernetes-int-or-string`,
//! `x-kubernetes-embedded-resource`, nullable. Not evaluated:
//! `x-kubernetes-validations` (CEL); formats other than what `type` implies.

use serde_json::Value;

/// Validates `obj` (a whole custom resource) and prunes unknown fields in place.
/// Returns every problem as `(field path, message)`.
pub fn validate_and_prune(schema: &Value, obj: &mut Value) -> Vec<(String, String)> {
    validate_and_prune_reporting(schema, obj, &mut Vec::new())
}

/// Paths of the fields pruning would drop: `fieldValidation=Strict` rejects them.
pub fn unknown_fields(schema: &Value, obj: &Value) -> Vec<String> {
    let mut pruned = Vec::new();
    validate_and_prune_reporting(schema, &mut obj.clone(), &mut pruned);
    pruned
}

fn validate_and_prune_reporting(schema: &Value, obj: &mut Value, pruned: &mut Vec<String>) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    // apiVersion, kind and metadata are validated by the server, not the schema.
    if let Value::Object(m) = obj {
        let props = schema.get("properties");
        let preserve = preserves(schema);
        let keys: Vec<String> = m.keys().cloned().collect();
        for k in keys {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            match props.and_then(|p| p.get(&k)) {
                Some(sub) => {
                    if let Some(v) = m.get_mut(&k) {
                        check(sub, v, &k, &mut errors, pruned);
                    }
                }
                None if !preserve => {
                    m.remove(&k);
                    pruned.push(k);
                }
                None => {}
            }
        }
        for req in required(schema) {
            if !m.contains_key(req) {
                errors.push((req.to_string(), "Required value".to_string()));
            }
        }
    }
    errors
}

fn preserves(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"]
        .as_bool()
        .unwrap_or(false)
}

fn required(schema: &Value) -> impl Iterator<Item = &str> {
    schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(schema: &Value, v: &mut Value, path: &str, errors: &mut Vec<(String, String)>, pruned: &mut Vec<String>) {
    if v.is_null() {
        if !schema["nullable"].as_bool().unwrap_or(false) {
            errors.push((path.into(), "Invalid value: null: field must not be null".into()));
        }
        return;
    }
    let int_or_string = schema["x-kubernetes-int-or-string"].as_bool().unwrap_or(false);
    if let Some(want) = schema["type"].as_str() {
        let have = type_name(v);
        let ok = have == want
            || (want == "number" && have == "integer")
            || (int_or_string && (have == "integer" || have == "string"));
        if !ok {
            errors.push((path.into(), format!("Invalid value: {have}: must be of type {want}")));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            errors.push((
                path.into(),
                format!("Unsupported value: {v}: supported values: {}", list.join(", ")),
            ));
        }
    }
    match v {
        Value::String(s) => {
            if let Some(max) = schema["maxLength"].as_u64() {
                if s.chars().count() as u64 > max {
                    errors.push((path.into(), format!("Too long: may not be more than {max} bytes")));
                }
            }
            if let Some(min) = schema["minLength"].as_u64() {
                if (s.chars().count() as u64) < min {
                    errors.push((
                        path.into(),
                        format!("Invalid value: {s:?}: should be at least {min} chars long"),
                    ));
                }
            }
            if let Some(p) = schema["pattern"].as_str() {
                match regex::Regex::new(p) {
                    Ok(re) if !re.is_match(s) => {
                        errors.push((path.into(), format!("Invalid value: {s:?}: should match '{p}'")));
                    }
                    Ok(_) => {}
                    Err(e) => errors.push((path.into(), format!("schema pattern {p:?} does not compile: {e}"))),
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema["minimum"].as_f64() {
                if x < min {
                    errors.push((
                        path.into(),
                        format!("Invalid value: {n}: should be greater than or equal to {min}"),
                    ));
                }
            }
            if let Some(max) = schema["maximum"].as_f64() {
                if x > max {
                    errors.push((
                        path.into(),
                        format!("Invalid value: {n}: should be less than or equal to {max}"),
                    ));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64() {
                if items.len() as u64 > max {
                    errors.push((
                        path.into(),
                        format!("Too many: {}: must have at most {max} items", items.len()),
                    ));
                }
            }
            if let Some(min) = schema["minItems"].as_u64() {
                if (items.len() as u64) < min {
                    errors.push((
                        path.into(),
                        format!("Invalid value: {} items: must have at least {min}", items.len()),
                    ));
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), errors, pruned);
                }
            }
        }
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            // Defaults of absent properties, as the API server applies them.
            for (k, sub) in props.into_iter().flatten() {
                if let (None, Some(d)) = (m.get(k), sub.get("default")) {
                    m.insert(k.clone(), d.clone());
                }
            }
            let additional = schema.get("additionalProperties");
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let child_path = format!("{path}.{k}");
                let embedded_meta = schema["x-kubernetes-embedded-resource"].as_bool().unwrap_or(false)
                    && matches!(k.as_str(), "apiVersion" | "kind" | "metadata");
                if let Some(sub) = props.and_then(|p| p.get(&k)) {
                    if let Some(child) = m.get_mut(&k) {
                        check(sub, child, &child_path, errors, pruned);
                    }
                } else if let Some(add) = additional.filter(|a| a.is_object()) {
                    if let Some(child) = m.get_mut(&k) {
                        check(add, child, &child_path, errors, pruned);
                    }
                } else if !(preserves(schema) || embedded_meta || additional.and_then(Value::as_bool) == Some(true)) {
                    m.remove(&k);
                    pruned.push(child_path);
                }
            }
            for req in required(schema) {
                if !m.contains_key(req) {
                    errors.push((format!("{path}.{req}"), "Required value".to_string()));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {"type": "object", "required": ["mode"], "properties": {
            "mode": {"type": "string", "enum": ["actor", "task"]},
            "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
            "count": {"type": "integer", "minimum": 1, "maximum": 3},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}}})
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let mut o = json!({"spec": {"mode": "batch", "name": "ABCDEFG", "count": 9, "labels": {"a": 1}}});
        let errs = validate_and_prune(&schema(), &mut o);
        let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec!["spec.count", "spec.labels.a", "spec.mode", "spec.name", "spec.name"]
        );
        let mut o = json!({"spec": {}});
        assert_eq!(
            validate_and_prune(&schema(), &mut o)[0],
            ("spec.mode".into(), "Required value".into())
        );
    }

    #[test]
    fn applies_defaults() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {"mode": {"type": "string", "default": "actor"}}}}});
        let mut o = json!({"spec": {}});
        assert!(validate_and_prune(&schema, &mut o).is_empty());
        assert_eq!(o, json!({"spec": {"mode": "actor"}}));
    }

    #[test]
    fn prunes_unknown_fields_but_keeps_preserved_ones() {
        let mut o = json!({"spec": {"mode": "actor", "bogus": 1, "free": {"x": {"y": 1}}}, "extra": true});
        assert!(validate_and_prune(&schema(), &mut o).is_empty());
        assert_eq!(o, json!({"spec": {"mode": "actor", "free": {"x": {"y": 1}}}}));
        let o = json!({"spec": {"mode": "actor", "bogus": 1}, "extra": true});
        assert_eq!(
            unknown_fields(&schema(), &o),
            vec!["extra".to_string(), "spec.bogus".to_string()]
        );
    }
}
