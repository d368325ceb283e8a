//! CRD schema enforcement, as kube-apiserver does it for custom resources: defaulting, pruning of
//! unknown fields, structural validation (types, enums, ranges, lengths, patterns, list types)
//! and CEL `x-kubernetes-validations` rules (evaluated by `kube-cel`).
//!
//! Error messages follow the apiserver's wording (`spec.training.steps: Invalid value: 0:
//! spec.training.steps in body should be greater than or equal to 1`) so that tests written
//! against the emulator read like a real cluster's output.
//!
//! Known approximations are listed in the crate README (for example: formats other than
//! `date-time`, `int-or-string` and `byte` are not checked).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The kind of a field error, named after Kubernetes' `field.ErrorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// A required field is missing (`Required value`).
    Required,
    /// A value breaks a constraint (`Invalid value`).
    Invalid,
    /// A value is not one of an enum's values (`Unsupported value`).
    NotSupported,
    /// A set or map-keyed list has a repeated entry (`Duplicate value`).
    Duplicate,
    /// A list or string is too long (`Too many`/`Too long`).
    TooMany,
}

impl ErrorType {
    /// The `reason` Kubernetes puts in a `Status.details.causes[].reason`.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorType::Required => "FieldValueRequired",
            ErrorType::Invalid => "FieldValueInvalid",
            ErrorType::NotSupported => "FieldValueNotSupported",
            ErrorType::Duplicate => "FieldValueDuplicate",
            ErrorType::TooMany => "FieldValueTooMany",
        }
    }
}

/// One validation failure at one field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Dotted path to the field, e.g. `spec.training.steps` or `spec.placement.regions[1]`.
    pub path: String,
    /// What kind of failure.
    pub error_type: ErrorType,
    /// The offending value, when there is one.
    pub value: Option<Value>,
    /// The explanation after the value.
    pub detail: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error_type {
            ErrorType::Required => write!(f, "{}: Required value", self.path)?,
            ErrorType::Invalid => write!(f, "{}: Invalid value: {}", self.path, show(&self.value))?,
            ErrorType::NotSupported => {
                write!(f, "{}: Unsupported value: {}", self.path, show(&self.value))?
            }
            ErrorType::Duplicate => {
                write!(f, "{}: Duplicate value: {}", self.path, show(&self.value))?
            }
            ErrorType::TooMany => write!(f, "{}: Too many", self.path)?,
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// How a value is quoted in a field error: strings and numbers as themselves, objects and
/// lists by their type, as the apiserver does.
fn show(value: &Option<Value>) -> String {
    match value {
        None | Some(Value::Null) => "null".to_string(),
        Some(Value::Object(_)) => "\"object\"".to_string(),
        Some(Value::Array(_)) => "\"array\"".to_string(),
        Some(v) => v.to_string(),
    }
}

/// A compiled CRD version schema: the `openAPIV3Schema` plus its compiled CEL rules.
pub struct Schema {
    root: Value,
    cel: kube_cel::CompiledSchema,
    validator: kube_cel::Validator,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema").finish_non_exhaustive()
    }
}

/// Problems with the schema itself (not with an object).
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A CEL rule in the schema does not compile.
    #[error("x-kubernetes-validations: {message}")]
    CompileRule {
        /// The rule and why it does not compile.
        message: String,
    },
}

/// The first CEL compilation error anywhere in the schema tree.
fn first_compile_error(node: &kube_cel::CompiledSchema) -> Option<String> {
    if let Some(err) = node.compilation_errors().first() {
        return Some(err.to_string());
    }
    children(node).find_map(first_compile_error)
}

/// Every schema node directly below `node` (properties, items, additionalProperties and the
/// allOf/oneOf/anyOf branches).
fn children(node: &kube_cel::CompiledSchema) -> impl Iterator<Item = &kube_cel::CompiledSchema> {
    node.properties
        .values()
        .chain(node.items.as_deref())
        .chain(node.additional_properties.as_deref())
        .chain(&node.all_of)
        .chain(&node.one_of)
        .chain(&node.any_of)
}

impl Schema {
    /// Compiles an `openAPIV3Schema`. Fails when a CEL rule does not compile, as the apiserver
    /// refuses such a CRD.
    pub fn new(open_api_v3_schema: Value) -> Result<Self, SchemaError> {
        let cel = kube_cel::compile_schema(&open_api_v3_schema);
        if let Some(message) = first_compile_error(&cel) {
            return Err(SchemaError::CompileRule { message });
        }
        Ok(Schema {
            root: open_api_v3_schema,
            cel,
            validator: kube_cel::Validator::new(),
        })
    }

    /// The raw `openAPIV3Schema`.
    pub fn raw(&self) -> &Value {
        &self.root
    }

    /// Admits an object as the apiserver does on create or update: prunes unknown fields,
    /// applies defaults, then validates (structure first, then CEL rules with `oldSelf` bound
    /// to `old` on update). Returns the object to store, or every field error found.
    pub fn admit(&self, mut object: Value, old: Option<&Value>) -> Result<Value, Vec<FieldError>> {
        prune(&self.root, &mut object, true);
        apply_defaults(&self.root, &mut object);
        let mut errors = Vec::new();
        validate_node(&self.root, &object, "", &mut errors, true);
        if errors.is_empty() {
            errors.extend(self.cel_errors(&object, old));
        }
        if errors.is_empty() {
            Ok(object)
        } else {
            Err(errors)
        }
    }

    fn cel_errors(&self, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
        if old.is_some_and(|old| self.only_rule_free_changes(object, old)) {
            return Vec::new();
        }
        let Err(errs) = self.validator.validate_compiled(&self.cel, object, old) else {
            return Vec::new();
        };
        errs.into_vec()
            .into_iter()
            .map(|e| {
                let path = if e.field_path.is_empty() {
                    "<root>".to_string()
                } else {
                    e.field_path.clone()
                };
                let value = lookup(object, &path).cloned();
                FieldError {
                    path,
                    error_type: ErrorType::Invalid,
                    value,
                    detail: e.message,
                }
            })
            .collect()
    }
}

/// A schema `pattern` compiled once per process: compiling it on every admitted object
/// dominated the cost of a create. Shared behind an `Arc`, not cloned: a cloned `Regex` gets
/// a fresh match-cache pool, so every match on a clone built its lazy DFA from scratch.
fn compiled_pattern(pattern: &str) -> Result<Arc<regex::Regex>, regex::Error> {
    type Cache = HashMap<String, Result<Arc<regex::Regex>, regex::Error>>;
    static CACHE: std::sync::LazyLock<std::sync::Mutex<Cache>> =
        std::sync::LazyLock::new(Default::default);
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(hit) = cache.get(pattern) {
        return hit.clone();
    }
    let compiled = regex::Regex::new(pattern).map(Arc::new);
    cache.insert(pattern.to_string(), compiled.clone());
    compiled
}

impl Schema {
    /// Validation ratcheting (CRDValidationRatcheting, on by default since Kubernetes 1.30):
    /// rules over values an update leaves unchanged do not fail it. When every top-level field
    /// that changed carries no CEL rule (a status write, say), no rule can fail, and evaluating
    /// them all was most of the cost of a status update.
    fn only_rule_free_changes(&self, object: &Value, old: &Value) -> bool {
        if !self.cel.validations.is_empty() {
            return false;
        }
        let (Some(new), Some(old)) = (object.as_object(), old.as_object()) else {
            return false;
        };
        new.keys()
            .chain(old.keys())
            .filter(|k| new.get(*k) != old.get(*k))
            .all(|k| self.cel.properties.get(k).is_none_or(|c| !has_rules(c)))
    }
}

/// Whether a compiled schema node or anything below it carries CEL rules.
fn has_rules(node: &kube_cel::CompiledSchema) -> bool {
    !node.validations.is_empty() || children(node).any(has_rules)
}

/// Finds the value at a dotted path (no list indices), for quoting it in a CEL error.
fn lookup<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(object, |v, key| v.get(key))
}

fn preserves_unknown(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

/// Whether a schema node is `x-kubernetes-embedded-resource` or the root: both keep
/// `apiVersion`, `kind` and `metadata` even when not listed.
fn keeps_type_meta(schema: &Value, is_root: bool) -> bool {
    is_root
        || schema
            .get("x-kubernetes-embedded-resource")
            .and_then(Value::as_bool)
            == Some(true)
}

/// Removes fields the schema does not declare, unless it preserves unknown fields.
pub fn prune(schema: &Value, value: &mut Value, is_root: bool) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if let Some(props) = props {
                let keep_meta = keeps_type_meta(schema, is_root);
                let preserve = preserves_unknown(schema);
                map.retain(|k, _| {
                    props.contains_key(k)
                        || preserve
                        || (keep_meta && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
                });
                for (k, v) in map.iter_mut() {
                    if let Some(p) = props.get(k) {
                        prune(p, v, false);
                    }
                }
            } else if let Some(add) = additional {
                for v in map.values_mut() {
                    prune(add, v, false);
                }
            } else if !preserves_unknown(schema) && !keeps_type_meta(schema, is_root) {
                map.clear();
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    prune(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

/// Fills in missing fields that have a `default`, top-down, so the defaults of a defaulted
/// object's own fields apply too (as the apiserver's structural defaulting does).
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, p) in props {
                    if !map.contains_key(k)
                        && let Some(d) = p.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                }
                for (k, v) in map.iter_mut() {
                    if let Some(p) = props.get(k) {
                        apply_defaults(p, v);
                    }
                }
            } else if let Some(add) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for v in map.values_mut() {
                    apply_defaults(add, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Validates one node and everything under it against its schema.
fn validate_node(
    schema: &Value,
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
    is_root: bool,
) {
    let shown_path = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) && !path.is_empty() {
            errors.push(FieldError {
                path: shown_path.to_string(),
                error_type: ErrorType::Invalid,
                value: Some(Value::Null),
                detail: format!(
                    "{shown_path} in body must be of type {}: \"null\"",
                    declared_type(schema)
                ),
            });
        }
        return;
    }
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errors.push(type_error(shown_path, "integer or string", value));
        }
        return;
    }
    let declared = declared_type(schema);
    if !declared.is_empty() && !type_matches(declared, value) {
        errors.push(type_error(shown_path, declared, value));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list = allowed
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        errors.push(FieldError {
            path: shown_path.to_string(),
            error_type: ErrorType::NotSupported,
            value: Some(value.clone()),
            detail: format!("supported values: {list}"),
        });
    }
    match value {
        Value::Number(n) => check_number(schema, n, shown_path, value, errors),
        Value::String(s) => check_string(schema, s, shown_path, value, errors),
        Value::Array(items) => check_array(schema, items, path, shown_path, errors),
        Value::Object(map) => check_object(schema, map, path, errors, is_root),
        _ => {}
    }
}

fn declared_type(schema: &Value) -> &str {
    schema.get("type").and_then(Value::as_str).unwrap_or("")
}

fn type_matches(declared: &str, value: &Value) -> bool {
    match declared {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    }
}

fn type_error(path: &str, declared: &str, value: &Value) -> FieldError {
    FieldError {
        path: path.to_string(),
        error_type: ErrorType::Invalid,
        value: Some(value.clone()),
        detail: format!(
            "{path} in body must be of type {declared}: \"{}\"",
            type_name(value)
        ),
    }
}

fn invalid(path: &str, value: &Value, detail: String) -> FieldError {
    FieldError {
        path: path.to_string(),
        error_type: ErrorType::Invalid,
        value: Some(value.clone()),
        detail,
    }
}

fn check_number(
    schema: &Value,
    n: &serde_json::Number,
    path: &str,
    value: &Value,
    errors: &mut Vec<FieldError>,
) {
    let Some(x) = n.as_f64() else { return };
    let exclusive_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
    let exclusive_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        if exclusive_min && x <= min {
            errors.push(invalid(
                path,
                value,
                format!("{path} in body should be greater than {}", fmt_num(min)),
            ));
        } else if x < min {
            errors.push(invalid(
                path,
                value,
                format!(
                    "{path} in body should be greater than or equal to {}",
                    fmt_num(min)
                ),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        if exclusive_max && x >= max {
            errors.push(invalid(
                path,
                value,
                format!("{path} in body should be less than {}", fmt_num(max)),
            ));
        } else if x > max {
            errors.push(invalid(
                path,
                value,
                format!(
                    "{path} in body should be less than or equal to {}",
                    fmt_num(max)
                ),
            ));
        }
    }
    if let Some(m) = schema.get("multipleOf").and_then(Value::as_f64)
        && m > 0.0
        && (x / m).fract().abs() > 1e-9
    {
        errors.push(invalid(
            path,
            value,
            format!("{path} in body should be a multiple of {}", fmt_num(m)),
        ));
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn check_string(schema: &Value, s: &str, path: &str, value: &Value, errors: &mut Vec<FieldError>) {
    let chars = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        errors.push(invalid(
            path,
            value,
            format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        errors.push(FieldError {
            path: path.to_string(),
            error_type: ErrorType::TooMany,
            value: Some(value.clone()),
            detail: format!("may not be more than {max} bytes"),
        });
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match compiled_pattern(pattern) {
            Ok(re) if !re.is_match(s) => {
                errors.push(invalid(
                    path,
                    value,
                    format!("{path} in body should match '{pattern}'"),
                ));
            }
            Ok(_) => {}
            Err(_) => errors.push(invalid(
                path,
                value,
                format!("schema pattern '{pattern}' does not compile"),
            )),
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") && !looks_like_rfc3339(s) {
        errors.push(invalid(
            path,
            value,
            format!("{path} in body must be of type date-time: \"{s}\""),
        ));
    }
}

/// A cheap RFC 3339 shape check (`2026-01-02T03:04:05Z` or with an offset/fraction).
fn looks_like_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && b[16] == b':'
        && (s.ends_with('Z') || s.ends_with('z') || s[19..].contains(['+', '-']))
}

fn check_array(
    schema: &Value,
    items: &[Value],
    path: &str,
    shown: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && items.len() as u64 > max
    {
        errors.push(FieldError {
            path: shown.to_string(),
            error_type: ErrorType::TooMany,
            value: None,
            detail: format!("{} items, must have at most {max} items", items.len()),
        });
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && (items.len() as u64) < min
    {
        errors.push(FieldError {
            path: shown.to_string(),
            error_type: ErrorType::Invalid,
            value: Some(Value::Array(items.to_vec())),
            detail: format!("{shown} in body should have at least {min} items"),
        });
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            let mut seen = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                if !seen.insert(item.to_string()) {
                    errors.push(FieldError {
                        path: format!("{shown}[{i}]"),
                        error_type: ErrorType::Duplicate,
                        value: Some(item.clone()),
                        detail: String::new(),
                    });
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<String> = keys
                    .iter()
                    .map(|k| item.get(*k).map(Value::to_string).unwrap_or_default())
                    .collect();
                if !seen.insert(key) {
                    errors.push(FieldError {
                        path: format!("{shown}[{i}]"),
                        error_type: ErrorType::Duplicate,
                        value: Some(item.clone()),
                        detail: String::new(),
                    });
                }
            }
        }
        _ => {}
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate_node(item_schema, item, &format!("{path}[{i}]"), errors, false);
        }
    }
}

fn check_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
    is_root: bool,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for key in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(key) {
                errors.push(FieldError {
                    path: join(path, key),
                    error_type: ErrorType::Required,
                    value: None,
                    detail: String::new(),
                });
            }
        }
    }
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
        && map.len() as u64 > max
    {
        errors.push(FieldError {
            path: if path.is_empty() {
                "<root>".into()
            } else {
                path.to_string()
            },
            error_type: ErrorType::TooMany,
            value: None,
            detail: format!("must have at most {max} properties"),
        });
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (k, v) in map {
        if is_root
            && matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
            && props.is_none_or(|p| !p.contains_key(k))
        {
            continue;
        }
        if let Some(p) = props.and_then(|p| p.get(k)) {
            validate_node(p, v, &join(path, k), errors, false);
        } else if let Some(add) = additional {
            validate_node(add, v, &join(path, k), errors, false);
        }
    }
}

/// Reasons a CRD schema is not structural (the apiserver refuses such a CRD for
/// `apiextensions.k8s.io/v1`). Empty when the schema is structural.
pub fn structural_problems(schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    walk_structural(schema, "openAPIV3Schema", &mut problems, false);
    problems
}

fn walk_structural(schema: &Value, path: &str, problems: &mut Vec<String>, in_junction: bool) {
    let Some(node) = schema.as_object() else {
        problems.push(format!("{path}: must be an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "definitions",
        "$schema",
        "dependencies",
        "patternProperties",
    ] {
        if node.contains_key(forbidden) {
            problems.push(format!(
                "{path}.{forbidden}: forbidden in a structural schema"
            ));
        }
    }
    let escapes = node
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
        || node
            .get("x-kubernetes-preserve-unknown-fields")
            .and_then(Value::as_bool)
            == Some(true);
    let has_type = node
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    if in_junction {
        for key in [
            "type",
            "default",
            "nullable",
            "description",
            "additionalProperties",
        ] {
            if node.contains_key(key) {
                problems.push(format!(
                    "{path}.{key}: must not be set inside allOf/anyOf/oneOf/not"
                ));
            }
        }
    } else if !has_type && !escapes {
        problems.push(format!(
            "{path}.type: Required value: must not be empty for specified object fields"
        ));
    }
    if node.contains_key("properties")
        && node
            .get("additionalProperties")
            .is_some_and(Value::is_object)
    {
        problems.push(format!(
            "{path}: properties and additionalProperties are mutually exclusive"
        ));
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, p) in props {
            walk_structural(p, &format!("{path}.properties[{k}]"), problems, in_junction);
        }
    }
    if let Some(items) = node.get("items") {
        walk_structural(items, &format!("{path}.items"), problems, in_junction);
    }
    if let Some(add) = node.get("additionalProperties").filter(|a| a.is_object()) {
        walk_structural(
            add,
            &format!("{path}.additionalProperties"),
            problems,
            in_junction,
        );
    }
    for junction in ["allOf", "anyOf", "oneOf"] {
        if let Some(branches) = node.get(junction).and_then(Value::as_array) {
            for (i, b) in branches.iter().enumerate() {
                walk_structural(b, &format!("{path}.{junction}[{i}]"), problems, true);
            }
        }
    }
    if let Some(not) = node.get("not") {
        walk_structural(not, &format!("{path}.not"), problems, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::new(json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "count": {"type": "integer", "minimum": 1, "maximum": 5, "default": 2},
                        "color": {"type": "string", "enum": ["red", "blue"]},
                        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
                        "inner": {"type": "object", "default": {}, "properties": {"x": {"type": "integer", "default": 7}}},
                        "fixed": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "fixed is immutable"}]}
                    },
                    "x-kubernetes-validations": [{"rule": "self.count < 5 || self.color == 'red'", "message": "five needs red"}]
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn defaults_apply_to_defaulted_objects_too() {
        let out = schema()
            .admit(json!({"spec": {"name": "a"}}), None)
            .unwrap();
        assert_eq!(out["spec"]["count"], 2);
        assert_eq!(out["spec"]["inner"]["x"], 7);
    }

    #[test]
    fn unknown_fields_are_pruned_but_type_meta_kept() {
        let out = schema()
            .admit(json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "n"}, "spec": {"name": "a", "bogus": 1}, "junk": true}), None)
            .unwrap();
        assert!(out["spec"].get("bogus").is_none());
        assert!(out.get("junk").is_none());
        assert_eq!(out["kind"], "K");
    }

    #[test]
    fn structural_errors_use_apiserver_wording() {
        let errs = schema()
            .admit(
                json!({"spec": {"name": "", "count": 0, "color": "green", "tags": ["a", "a"]}}),
                None,
            )
            .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(text.contains(&"spec.name: Invalid value: \"\": spec.name in body should be at least 1 chars long".to_string()), "{text:?}");
        assert!(text.contains(&"spec.count: Invalid value: 0: spec.count in body should be greater than or equal to 1".to_string()), "{text:?}");
        assert!(
            text.contains(
                &"spec.color: Unsupported value: \"green\": supported values: \"red\", \"blue\""
                    .to_string()
            ),
            "{text:?}"
        );
        assert!(
            text.contains(&"spec.tags[1]: Duplicate value: \"a\"".to_string()),
            "{text:?}"
        );
    }

    #[test]
    fn missing_required_field_is_reported() {
        let errs = schema().admit(json!({"spec": {}}), None).unwrap_err();
        assert_eq!(errs[0].to_string(), "spec.name: Required value");
    }

    #[test]
    fn cel_rules_run_after_structure_and_see_old_self() {
        let s = schema();
        let errs = s
            .admit(
                json!({"spec": {"name": "a", "count": 5, "color": "blue"}}),
                None,
            )
            .unwrap_err();
        assert!(errs[0].to_string().contains("five needs red"), "{errs:?}");
        let old = json!({"spec": {"name": "a", "fixed": "one"}});
        let errs = s
            .admit(json!({"spec": {"name": "a", "fixed": "two"}}), Some(&old))
            .unwrap_err();
        assert!(
            errs[0].to_string().contains("fixed is immutable"),
            "{errs:?}"
        );
        assert!(
            s.admit(json!({"spec": {"name": "a", "fixed": "one"}}), Some(&old))
                .is_ok()
        );
    }

    #[test]
    fn rules_are_ratcheted_when_only_rule_free_fields_change() {
        let s = Schema::new(json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"count": {"type": "integer"}},
                     "x-kubernetes-validations": [{"rule": "self.count < 5", "message": "too many"}]},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        }}))
        .unwrap();
        // Stored before the rule existed.
        let old = json!({"spec": {"count": 7}, "status": {"phase": "A"}});
        assert!(
            s.admit(
                json!({"spec": {"count": 7}, "status": {"phase": "B"}}),
                Some(&old)
            )
            .is_ok(),
            "a status write is not failed by a rule over the unchanged spec"
        );
        let errs = s
            .admit(
                json!({"spec": {"count": 8}, "status": {"phase": "B"}}),
                Some(&old),
            )
            .unwrap_err();
        assert!(errs[0].to_string().contains("too many"), "{errs:?}");
        assert!(
            s.admit(json!({"spec": {"count": 7}}), None).is_err(),
            "a create is always validated"
        );
    }

    #[test]
    fn wrong_types_are_rejected() {
        let errs = schema()
            .admit(json!({"spec": {"name": 3}}), None)
            .unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "spec.name: Invalid value: 3: spec.name in body must be of type string: \"integer\""
        );
    }
}
