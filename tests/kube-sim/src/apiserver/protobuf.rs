//! Kubernetes' protobuf encoding of request bodies (`application/vnd.kubernetes.protobuf`),
//! which kubectl and client-go send for built-in kinds (`kubectl create namespace|secret|
//! configmap|serviceaccount`). The body is the magic `k8s\0` followed by a `runtime.Unknown`
//! envelope naming the object's apiVersion and kind and holding its protobuf bytes. The kinds
//! in [`KINDS`] are decoded with k8s-pb's types and turned into the JSON the rest of the
//! apiserver handles (through k8s-openapi's types, whose serde encoding is the API's JSON);
//! other kinds get `415 UnsupportedMediaType` naming the kind, so a client can send JSON.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1 as json_core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as json_meta;
use k8s_pb::api::core::v1 as pb_core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as pb_meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::Value;

use super::meta::ApiError;

/// What every Kubernetes protobuf body starts with.
const MAGIC: &[u8] = b"k8s\0";

/// A protobuf message of a kind kube-sim decodes, and its JSON form.
trait ToJson: Message + Default + k8s_pb::Resource {
    fn to_json(self) -> Result<Value, serde_json::Error>;
}

/// Decodes one kind's protobuf bytes into its JSON.
type Decoder = fn(&[u8]) -> Result<Value, DecodeError>;

/// Why an object's bytes did not decode.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error(transparent)]
    Protobuf(#[from] prost::DecodeError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

fn decode_as<T: ToJson>(raw: &[u8]) -> Result<Value, DecodeError> {
    Ok(T::decode(raw)?.to_json()?)
}

/// One decodable kind: its apiVersion and kind (from k8s-pb), and its decoder.
struct Kind {
    api_version: &'static str,
    kind: &'static str,
    decode: Decoder,
}

const fn kind<T: ToJson>() -> Kind {
    Kind {
        api_version: T::API_VERSION,
        kind: T::KIND,
        decode: decode_as::<T>,
    }
}

/// The kinds kube-sim accepts in protobuf: those kubectl's imperative `create` commands send
/// for the types kube-sim serves. Add a row (and a [`ToJson`] impl) to accept another.
static KINDS: &[Kind] = &[
    kind::<pb_core::Namespace>(),
    kind::<pb_core::Secret>(),
    kind::<pb_core::ConfigMap>(),
    kind::<pb_core::ServiceAccount>(),
];

/// The JSON object of a protobuf request body.
pub(crate) fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let bad = |why: String| ApiError::bad_request(format!("error decoding protobuf: {why}"));
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("the body does not start with the k8s\\0 prefix".into()))?;
    let unknown = Unknown::decode(envelope).map_err(|e| bad(format!("runtime.Unknown: {e}")))?;
    if let Some(enc) = unknown
        .content_encoding
        .as_deref()
        .filter(|e| !e.is_empty())
    {
        return Err(bad(format!("unsupported contentEncoding {enc:?}")));
    }
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let row = KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
        .ok_or_else(|| {
            ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "kube-sim does not decode protobuf for {api_version:?} {kind:?} (it does for {}); send it as application/json",
                    KINDS
                        .iter()
                        .map(|k| k.kind)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
    (row.decode)(unknown.raw.as_deref().unwrap_or_default())
        .map_err(|e| bad(format!("{api_version} {kind}: {e}")))
}

/// `None` for an empty value. Go's protobuf encoder writes every field that is not a
/// pointer, empty or not, where its JSON encoder omits the empty ones (`omitempty`); the
/// JSON must read as if the client had sent JSON.
fn non_empty<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

/// [`non_empty`] for an optional field.
fn set<T: Default + PartialEq>(v: Option<T>) -> Option<T> {
    v.and_then(non_empty)
}

fn bytes(m: BTreeMap<String, Vec<u8>>) -> Option<BTreeMap<String, ByteString>> {
    non_empty(m).map(|m| m.into_iter().map(|(k, v)| (k, ByteString(v))).collect())
}

/// The fields of metadata a client sets; the server-set ones (timestamps, managedFields,
/// selfLink) are left to the apiserver.
fn object_meta(m: Option<pb_meta::ObjectMeta>) -> json_meta::ObjectMeta {
    let m = m.unwrap_or_default();
    json_meta::ObjectMeta {
        name: set(m.name),
        generate_name: set(m.generate_name),
        namespace: set(m.namespace),
        uid: set(m.uid),
        resource_version: set(m.resource_version),
        generation: set(m.generation),
        labels: non_empty(m.labels),
        annotations: non_empty(m.annotations),
        finalizers: non_empty(m.finalizers),
        owner_references: non_empty(
            m.owner_references
                .into_iter()
                .map(|o| json_meta::OwnerReference {
                    api_version: o.api_version.unwrap_or_default(),
                    kind: o.kind.unwrap_or_default(),
                    name: o.name.unwrap_or_default(),
                    uid: o.uid.unwrap_or_default(),
                    controller: o.controller,
                    block_owner_deletion: o.block_owner_deletion,
                })
                .collect(),
        ),
        ..Default::default()
    }
}

impl ToJson for pb_core::Namespace {
    fn to_json(self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(json_core::Namespace {
            metadata: object_meta(self.metadata),
            spec: self.spec.map(|s| json_core::NamespaceSpec {
                finalizers: non_empty(s.finalizers),
            }),
            status: None,
        })
    }
}

impl ToJson for pb_core::Secret {
    fn to_json(self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(json_core::Secret {
            metadata: object_meta(self.metadata),
            data: bytes(self.data),
            string_data: non_empty(self.string_data),
            type_: set(self.r#type),
            immutable: self.immutable,
        })
    }
}

impl ToJson for pb_core::ConfigMap {
    fn to_json(self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(json_core::ConfigMap {
            metadata: object_meta(self.metadata),
            data: non_empty(self.data),
            binary_data: bytes(self.binary_data),
            immutable: self.immutable,
        })
    }
}

impl ToJson for pb_core::ServiceAccount {
    fn to_json(self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(json_core::ServiceAccount {
            metadata: object_meta(self.metadata),
            secrets: non_empty(
                self.secrets
                    .into_iter()
                    .map(|r| json_core::ObjectReference {
                        api_version: set(r.api_version),
                        field_path: set(r.field_path),
                        kind: set(r.kind),
                        name: set(r.name),
                        namespace: set(r.namespace),
                        resource_version: set(r.resource_version),
                        uid: set(r.uid),
                    })
                    .collect(),
            ),
            image_pull_secrets: non_empty(
                self.image_pull_secrets
                    .into_iter()
                    .map(|r| json_core::LocalObjectReference {
                        name: r.name.unwrap_or_default(),
                    })
                    .collect(),
            ),
            automount_service_account_token: self.automount_service_account_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    fn envelope<T: Message + k8s_pb::Resource>(obj: &T) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(T::API_VERSION.into()),
                kind: Some(T::KIND.into()),
            }),
            raw: Some(obj.encode_to_vec()),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    fn meta(name: &str) -> Option<pb_meta::ObjectMeta> {
        // As Go writes it: empty strings and zeros included.
        Some(pb_meta::ObjectMeta {
            name: Some(name.into()),
            generate_name: Some(String::new()),
            namespace: Some(String::new()),
            generation: Some(0),
            labels: [("app".to_string(), "x".to_string())].into(),
            ..Default::default()
        })
    }

    #[test]
    fn secrets_decode_to_their_json_with_base64_data() {
        let secret = pb_core::Secret {
            metadata: meta("s"),
            data: [("a".to_string(), b"b".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let json = decode(&envelope(&secret)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "s", "labels": {"app": "x"}},
                "data": {"a": "Yg=="}, "type": "Opaque",
            })
        );
    }

    #[test]
    fn namespaces_and_config_maps_decode() {
        let ns = decode(&envelope(&pb_core::Namespace {
            metadata: meta("n"),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(ns["kind"], "Namespace");
        assert_eq!(ns["metadata"]["name"], "n");
        let cm = decode(&envelope(&pb_core::ConfigMap {
            metadata: meta("c"),
            data: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(cm["data"]["k"], "v");
        assert!(cm.get("binaryData").is_none());
    }

    #[test]
    fn other_kinds_and_garbage_are_refused() {
        let pod = decode(&envelope(&pb_core::Pod {
            metadata: meta("p"),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!((pod.code, pod.reason), (415, "UnsupportedMediaType"));
        assert!(pod.message.contains("\"Pod\""), "{}", pod.message);
        let garbage = decode(b"k8s\0\xff\xff\xff\xff").unwrap_err();
        assert_eq!(garbage.code, 400);
        let no_magic = decode(b"{}").unwrap_err();
        assert_eq!(no_magic.code, 400);
    }
}
