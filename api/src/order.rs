//! Orders, the pure part: what an order says (a draft order or the service API's job request,
//! both JSON), how it becomes a `LoRATrainingJobSpec` with the plan's resolved policy, and the
//! deterministic, non-reversible names that make delivery idempotent.
//!
//! Identifiers from the payment world (checkout sessions, payment intents, order ids) never
//! appear in the cluster in clear: they are keyed-hashed (HMAC-SHA256 with the API's id key),
//! so names and labels are stable for the same order yet say nothing about the payment.

use hmac::{Hmac, Mac};
use loraplane_crds::platform::PlatformConfig;
use loraplane_crds::v1alpha1::{
    BaseModel, Concept, ConceptType, DataUse, Dataset, GpuProduct, LoRATrainingJobSpec,
    ModelFamily, Placement, RegionName, Resources, Retention, RetentionMode, Samples, Training,
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::{Plan, parse_residency};

/// The job labels the operator reads too (the audit record carries none of them; refunds and
/// disputes find jobs by the payment's) are defined once, with the other shared label keys.
pub use loraplane_crds::layout::{LABEL_ORDER, LABEL_PAYMENT};
/// Label on a tombstone ConfigMap holding the hashed payment (refund, dispute) or order
/// (erasure) it stands for, so one list finds both an order's tombstones.
pub const LABEL_TOMBSTONE_OF: &str = "loraplane.io/tombstone-of";
/// Label on a job holding the hashed idempotency key of the request that created it.
pub const LABEL_IDEMPOTENCY: &str = "loraplane.io/idempotency-key";
/// Annotation holding the hash of the request body that created the job.
pub const ANNOTATION_REQUEST: &str = "loraplane.io/request-sha256";
/// Label on a job telling how it was ordered.
pub const LABEL_SOURCE: &str = "loraplane.io/source";
/// Label on a job holding the plan name.
pub const LABEL_PLAN: &str = "loraplane.io/plan";

/// The API's keyed MAC (HMAC-SHA256 with `ID_HASH_KEY`) over a purpose and its parts, each
/// part after a NUL so no two inputs run together. Names (job, tombstone) and dataset
/// receipts all come from it.
pub fn keyed_mac(key: &[u8], kind: &str, parts: &[&str]) -> Option<Hmac<Sha256>> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    mac.update(kind.as_bytes());
    for part in parts {
        mac.update(b"\0");
        mac.update(part.as_bytes());
    }
    Some(mac)
}

/// `keyed_mac` as 32 lowercase hex digits (128 bits).
pub fn hash_parts(key: &[u8], kind: &str, parts: &[&str]) -> String {
    let Some(mac) = keyed_mac(key, kind, parts) else {
        return String::new();
    };
    let mut h = hex::encode(mac.finalize().into_bytes());
    h.truncate(32);
    h
}

/// A keyed hash of an identifier, as 32 lowercase hex digits (128 bits).
pub fn hash_id(key: &[u8], kind: &str, id: &str) -> String {
    hash_parts(key, kind, &[id])
}

/// The job name of an order: the same order always gets the same name, whatever the path.
pub fn job_name(order_hash: &str) -> String {
    format!("ltj-{}", &order_hash[..order_hash.len().min(24)])
}

/// A paid order's details.
#[derive(Serialize, Deserialize, Clone, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// `sd15` or `sdxl`.
    pub family: String,
    /// `character`, `style` or `object`.
    pub concept_type: String,
    /// The word that invokes the concept (sensitive).
    pub trigger_word: String,
    /// Free-text description (sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The plan name.
    pub plan: String,
    /// `eea`, `us` or `any`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency: Option<String>,
    /// The upload id returned by `POST /v1/uploads`.
    pub upload_id: String,
    /// Training steps; the plan's maximum when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    /// The receipt `POST /v1/uploads/{id}/validate` returned, if the storefront kept it: job
    /// creation then need not ask S3 whether the upload was checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_receipt: Option<String>,
    /// Whether the customer, on this order, consented to their images and LoRA being used to
    /// improve our models. The customer's answer, never the plan's: false unless given, and
    /// refused with a zero-retention plan (which keeps no copy to train on).
    #[serde(default)]
    pub training_consent: bool,
}

impl std::fmt::Debug for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Orders end up in error chains; the customer's words must not.
        f.debug_struct("Order")
            .field("family", &self.family)
            .field("plan", &self.plan)
            .field("upload_id", &self.upload_id)
            .finish_non_exhaustive()
    }
}

/// Why an order cannot become a job. Each variant is a machine code in API errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrderError {
    /// A required field is missing.
    #[error("order lacks {0}")]
    Missing(&'static str),
    /// A field has an unusable value.
    #[error("order field {field} is invalid: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// The plan is unknown.
    #[error("unknown plan {0:?}")]
    UnknownPlan(String),
    /// The upload's region is not allowed for the order.
    #[error("the upload is in region {0:?}, which the order's residency or plan does not allow")]
    RegionNotAllowed(String),
    /// The plan has no price, so no draft can quote it.
    #[error("plan {0:?} has no price; order it through POST /v1/jobs")]
    Unpriced(String),
    /// The platform has no trainer for the family.
    #[error("this service does not train {0} models")]
    FamilyNotOffered(&'static str),
    /// The family's licence is not cleared for commercial use in the platform config.
    #[error("{0} is not licensed for commercial use on this service")]
    FamilyNotLicensed(&'static str),
}

impl OrderError {
    /// The machine code.
    pub fn code(&self) -> &'static str {
        match self {
            OrderError::Missing(_) => "order_field_missing",
            OrderError::Invalid { .. } => "order_field_invalid",
            OrderError::UnknownPlan(_) => "unknown_plan",
            OrderError::RegionNotAllowed(_) => "region_not_allowed",
            OrderError::Unpriced(_) => "plan_unpriced",
            OrderError::FamilyNotOffered(_) => "family_not_offered",
            OrderError::FamilyNotLicensed(_) => "family_not_licensed",
        }
    }
}

/// An upload id: the region whose bucket holds it and a random token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadId {
    /// Region name.
    pub region: String,
    /// 32 lowercase hex digits.
    pub token: String,
}

impl UploadId {
    /// Parses `REGION.TOKEN`.
    pub fn parse(s: &str) -> Option<UploadId> {
        let (region, token) = s.split_once('.')?;
        let region_ok = !region.is_empty()
            && region.len() <= 63
            && region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        let token_ok = token.len() == 32
            && token
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        (region_ok && token_ok).then(|| UploadId {
            region: region.into(),
            token: token.into(),
        })
    }

    /// The id as handed to clients.
    pub fn to_id(&self) -> String {
        format!("{}.{}", self.region, self.token)
    }

    /// The object key in the region's dataset bucket; namespaced, so a tenant can only ever
    /// reach its own uploads.
    pub fn key(&self, namespace: &str) -> String {
        loraplane_crds::layout::upload_key(namespace, &self.token)
    }
}

/// A draft order's id: like an upload's, the region whose dataset bucket holds it and a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftId(pub UploadId);

impl DraftId {
    /// Parses `REGION.TOKEN`.
    pub fn parse(s: &str) -> Option<DraftId> {
        UploadId::parse(s).map(DraftId)
    }

    /// The id as handed to clients and carried in the checkout's metadata.
    pub fn to_id(&self) -> String {
        self.0.to_id()
    }

    /// The region whose dataset bucket holds the draft.
    pub fn region(&self) -> &str {
        &self.0.region
    }

    /// The object key in the region's dataset bucket.
    pub fn key(&self, namespace: &str) -> String {
        loraplane_crds::layout::draft_key(namespace, &self.0.token)
    }
}

/// A draft order as stored: what the customer chose and the price quoted for it. Customer
/// text, so it lives in the upload's region and is never logged.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Draft {
    /// The order.
    pub order: Order,
    /// The plan's price when the draft was made.
    pub price: crate::config::Price,
    /// When it was made (Unix seconds).
    pub created_at: i64,
}

/// Everything [`build_spec`] needs besides the order.
#[derive(Debug)]
pub struct SpecInputs<'a> {
    /// The resolved plan.
    pub plan: &'a Plan,
    /// The platform's regions.
    pub platform: &'a PlatformConfig,
    /// The parsed upload id.
    pub upload: &'a UploadId,
    /// The dataset bucket of the upload's region.
    pub dataset_bucket: &'a str,
    /// The namespace of the job.
    pub namespace: &'a str,
    /// SHA-256 of the validated dataset zip.
    pub dataset_sha256: &'a str,
}

/// Turns an order into a job spec with the plan's policy written in.
pub fn build_spec(order: &Order, inp: &SpecInputs<'_>) -> Result<LoRATrainingJobSpec, OrderError> {
    let family = match order.family.as_str() {
        "sd15" => ModelFamily::Sd15,
        "sdxl" => ModelFamily::Sdxl,
        "flux1" => ModelFamily::Flux1,
        _ => {
            return Err(OrderError::Invalid {
                field: "family",
                message: "must be sd15, sdxl or flux1".into(),
            });
        }
    };
    match inp.platform.family(family) {
        None => return Err(OrderError::FamilyNotOffered(family.as_str())),
        Some(f) if !f.cleared_for_sale() => {
            return Err(OrderError::FamilyNotLicensed(family.as_str()));
        }
        Some(_) => {}
    }
    let concept_type = match order.concept_type.as_str() {
        "character" => ConceptType::Character,
        "style" => ConceptType::Style,
        "object" => ConceptType::Object,
        _ => {
            return Err(OrderError::Invalid {
                field: "conceptType",
                message: "must be character, style or object".into(),
            });
        }
    };
    let tw = &order.trigger_word;
    if !loraplane_crds::v1alpha1::trigger_word_ok(tw) {
        return Err(OrderError::Invalid {
            field: "triggerWord",
            message: "1 to 64 printable characters: no commas, control or format characters \
                      (line breaks, bidi overrides, zero-width marks), no surrounding blanks"
                .into(),
        });
    }
    if order
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > 2000)
    {
        return Err(OrderError::Invalid {
            field: "description",
            message: "at most 2000 characters".into(),
        });
    }
    let residency = parse_residency(order.residency.as_deref().unwrap_or("any")).ok_or(
        OrderError::Invalid {
            field: "residency",
            message: "must be eea, us or any".into(),
        },
    )?;
    let plan = inp.plan;
    let steps = order.steps.unwrap_or(plan.max_steps);
    if !(1..=plan.max_steps).contains(&steps) {
        return Err(OrderError::Invalid {
            field: "steps",
            message: format!(
                "must be between 1 and the plan's maximum {}",
                plan.max_steps
            ),
        });
    }
    let region = inp
        .platform
        .region(&inp.upload.region)
        .ok_or_else(|| OrderError::RegionNotAllowed(inp.upload.region.clone()))?;
    let plan_allows =
        |r: &str| plan.allowed_regions.is_empty() || plan.allowed_regions.iter().any(|a| a == r);
    if !region.jurisdiction.allows(residency) || !plan_allows(&region.name) {
        return Err(OrderError::RegionNotAllowed(region.name.clone()));
    }
    // The placement allow-list is the plan's regions inside the residency; empty means all.
    let regions: Vec<RegionName> = inp
        .platform
        .regions
        .iter()
        .filter(|r| r.jurisdiction.allows(residency) && plan_allows(&r.name))
        .map(|r| RegionName(r.name.clone()))
        .collect();
    let all_allowed = plan.allowed_regions.is_empty();
    let zero = plan.retention == RetentionMode::ZeroRetention;
    if zero && order.training_consent {
        return Err(OrderError::Invalid {
            field: "trainingConsent",
            message: "a zeroRetention plan keeps no copy to train on".into(),
        });
    }
    let training = Training {
        steps,
        // Orders (drafts and the service API's requests alike) carry no resolution,
        // so the plan decides; without one the field stays unset and the family default
        // applies when the operator renders the trainer's config.
        resolution: plan.resolution,
        checkpoint_every: None,
        ..Training::default()
    };
    let mut resources = Resources::default();
    resources.gpu.min_memory_gi_b = plan.min_gpu_memory_gib;
    resources.gpu.products = plan.gpu_products.iter().cloned().map(GpuProduct).collect();
    Ok(LoRATrainingJobSpec {
        // The customer sees the LoRA at work before the download (`GET /v1/jobs/{id}/samples`),
        // unless the plan turns samples off.
        samples: (plan.samples.steps > 0).then(|| Samples {
            steps: Some(plan.samples.steps),
            resolution: plan.samples.resolution,
            ..Samples::default()
        }),
        base_model: BaseModel {
            family,
            weights: None,
        },
        concept: Concept {
            concept_type,
            trigger_word: tw.clone(),
            description: order.description.clone(),
        },
        dataset: Dataset {
            uri: loraplane_crds::layout::s3_uri(inp.dataset_bucket, &inp.upload.key(inp.namespace)),
            sha256: inp.dataset_sha256.to_string(),
            region: Some(region.name.clone()),
        },
        training,
        resources,
        placement: Placement {
            residency,
            regions: if all_allowed { Vec::new() } else { regions },
            ..Placement::default()
        },
        retention: Retention {
            mode: plan.retention,
            keep_inputs_seconds: Some(if zero { 0 } else { plan.keep_inputs_seconds }),
            keep_outputs_seconds: Some(plan.keep_outputs_seconds),
        },
        data_use: DataUse {
            training_consent: order.training_consent,
            consent_withdrawn: false,
        },
        suspend: false,
        cancel: false,
        erasure: None,
        managed_by: None,
        active_deadline_seconds: None,
        backoff_limit: 3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraplane_crds::v1alpha1::Residency;

    fn platform() -> PlatformConfig {
        PlatformConfig::from_yaml(
            r#"
regions:
  - name: eu-west
    jurisdiction: eea
    s3: {endpoint: "http://127.0.0.1:1", region: us-east-1, forcePathStyle: true}
    buckets: {datasets: ds-eu, checkpoints: ck-eu, outputs: out-eu}
  - name: eu-north
    jurisdiction: eea
    s3: {endpoint: "http://127.0.0.1:1", region: us-east-1, forcePathStyle: true}
    buckets: {datasets: ds-eun, checkpoints: ck-eun, outputs: out-eun}
  - name: us-east
    jurisdiction: us
    s3: {endpoint: "http://127.0.0.1:1", region: us-east-1, forcePathStyle: true}
    buckets: {datasets: ds-us, checkpoints: ck-us, outputs: out-us}
pools: []
families:
  - {family: sd15, minGpuMemoryGib: 16, weights: /models/sd15, trainerImage: t}
  - {family: sdxl, minGpuMemoryGib: 24, weights: /models/sdxl, trainerImage: t}
"#,
        )
        .unwrap()
    }

    fn plan() -> Plan {
        Plan {
            retention: RetentionMode::Standard,
            keep_inputs_seconds: 100,
            keep_outputs_seconds: 200,
            allowed_regions: vec![],
            gpu_products: vec!["NVIDIA-L4".into()],
            min_gpu_memory_gib: Some(20),
            max_steps: 500,
            resolution: None,
            price: None,
            samples: Default::default(),
        }
    }

    fn order() -> Order {
        Order {
            family: "sdxl".into(),
            concept_type: "character".into(),
            trigger_word: "zxq".into(),
            description: Some("my dog".into()),
            plan: "basic".into(),
            residency: Some("eea".into()),
            upload_id: "eu-west.0123456789abcdef0123456789abcdef".into(),
            steps: None,
            dataset_receipt: None,
            training_consent: false,
        }
    }

    fn build(order: &Order, plan: &Plan) -> Result<LoRATrainingJobSpec, OrderError> {
        build_on(order, plan, &platform())
    }

    fn build_on(
        order: &Order,
        plan: &Plan,
        platform: &PlatformConfig,
    ) -> Result<LoRATrainingJobSpec, OrderError> {
        let upload = UploadId::parse(&order.upload_id).unwrap();
        let bucket = platform
            .region(&upload.region)
            .map(|r| r.buckets.datasets.clone())
            .unwrap_or_default();
        build_spec(
            order,
            &SpecInputs {
                plan,
                platform,
                upload: &upload,
                dataset_bucket: &bucket,
                namespace: "orders",
                dataset_sha256: &"a".repeat(64),
            },
        )
    }

    #[test]
    fn consent_is_the_customers_answer_never_the_plans() {
        assert!(!build(&order(), &plan()).unwrap().data_use.training_consent);
        let consenting = Order {
            training_consent: true,
            ..order()
        };
        assert!(
            build(&consenting, &plan())
                .unwrap()
                .data_use
                .training_consent
        );
        let zero = Plan {
            retention: RetentionMode::ZeroRetention,
            ..plan()
        };
        assert!(matches!(
            build(&consenting, &zero),
            Err(OrderError::Invalid {
                field: "trainingConsent",
                ..
            })
        ));
    }

    #[test]
    fn the_plan_policy_is_written_into_the_spec() {
        let spec = build(&order(), &plan()).unwrap();
        assert_eq!(spec.training.steps, 500);
        assert_eq!(spec.retention.keep_inputs_seconds, Some(100));
        assert_eq!(spec.retention.keep_outputs_seconds, Some(200));
        assert_eq!(spec.placement.residency, Residency::Eea);
        assert!(spec.placement.regions.is_empty());
        assert_eq!(spec.dataset.region.as_deref(), Some("eu-west"));
        assert_eq!(
            spec.dataset.uri,
            "s3://ds-eu/uploads/orders/0123456789abcdef0123456789abcdef.zip"
        );
        assert_eq!(spec.resources.gpu.min_memory_gi_b, Some(20));
        // The spec serialises into something the CRD schema accepts.
        let job = loraplane_crds::v1alpha1::LoRATrainingJob::new("x", spec);
        assert!(serde_json::to_value(&job).is_ok());
    }

    #[test]
    fn orders_render_the_plans_samples_unless_it_turns_them_off() {
        let mut p = plan();
        let s = build(&order(), &p)
            .unwrap()
            .samples
            .expect("samples by default");
        assert_eq!((s.steps, s.resolution), (Some(12), None));
        assert!(
            s.prompts.is_empty(),
            "the trainer's prompts from the trigger word"
        );
        p.samples.steps = 0;
        assert!(build(&order(), &p).unwrap().samples.is_none());
    }

    #[test]
    fn the_plan_resolution_reaches_the_spec() {
        let p = Plan {
            resolution: Some(256),
            ..plan()
        };
        let spec = build(&order(), &p).unwrap();
        assert_eq!(spec.training.resolution, Some(256));
        let job = loraplane_crds::v1alpha1::LoRATrainingJob::new("x", spec);
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["spec"]["training"]["resolution"], 256);
    }

    #[test]
    fn without_a_plan_resolution_the_family_default_applies() {
        let spec = build(&order(), &plan()).unwrap();
        assert_eq!(spec.training.resolution, None);
        // Unset in the object the API creates, so the family default (1024 for SDXL) applies.
        let job = loraplane_crds::v1alpha1::LoRATrainingJob::new("x", spec);
        let json = serde_json::to_value(&job).unwrap();
        assert!(json["spec"]["training"].get("resolution").is_none());
    }

    #[test]
    fn zero_retention_plans_keep_no_inputs() {
        let p = Plan {
            retention: RetentionMode::ZeroRetention,
            keep_outputs_seconds: 3600,
            ..plan()
        };
        let spec = build(&order(), &p).unwrap();
        assert_eq!(spec.retention.keep_inputs_seconds, Some(0));
        assert!(!spec.data_use.training_consent);
    }

    #[test]
    fn residency_and_plan_regions_restrict_the_upload_region() {
        let mut o = order();
        o.upload_id = "us-east.0123456789abcdef0123456789abcdef".into();
        assert_eq!(
            build(&o, &plan()),
            Err(OrderError::RegionNotAllowed("us-east".into()))
        );
        let p = Plan {
            allowed_regions: vec!["eu-north".into()],
            ..plan()
        };
        assert_eq!(
            build(&order(), &p),
            Err(OrderError::RegionNotAllowed("eu-west".into()))
        );
        let mut o = order();
        o.upload_id = "eu-north.0123456789abcdef0123456789abcdef".into();
        let spec = build(&o, &p).unwrap();
        assert_eq!(spec.placement.regions, vec![RegionName("eu-north".into())]);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut o = order();
        o.steps = Some(501);
        assert!(matches!(
            build(&o, &plan()),
            Err(OrderError::Invalid { field: "steps", .. })
        ));
        for bad in [
            "a, b",
            " lead",
            "nul\0byte",
            "line\u{2028}sep",
            "bidi\u{202e}txet",
            "zero\u{200b}width",
            "new\nline",
            "",
        ] {
            let mut o = order();
            o.trigger_word = bad.into();
            assert!(
                matches!(
                    build(&o, &plan()),
                    Err(OrderError::Invalid {
                        field: "triggerWord",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        for good in ["zxq", "van gogh", "café-ü", "東京"] {
            let mut o = order();
            o.trigger_word = good.into();
            assert!(build(&o, &plan()).is_ok(), "{good:?}");
        }
        let mut o = order();
        o.family = "flux".into();
        assert!(matches!(
            build(&o, &plan()),
            Err(OrderError::Invalid {
                field: "family",
                ..
            })
        ));
    }

    #[test]
    fn flux1_is_sold_only_when_its_licence_is_cleared() {
        let mut o = order();
        o.family = "flux1".into();
        let p = plan();
        // Not configured at all: not offered.
        let mut platform = platform();
        platform.families.retain(|f| f.family != ModelFamily::Flux1);
        let built = build_on(&o, &p, &platform);
        assert!(
            matches!(built, Err(OrderError::FamilyNotOffered("flux1"))),
            "{built:?}"
        );
        // Configured without a licence: FLUX.1-dev's terms are non-commercial.
        let mut flux = platform.families[0].clone();
        flux.family = ModelFamily::Flux1;
        platform.families.push(flux);
        let built = build_on(&o, &p, &platform);
        assert!(
            matches!(built, Err(OrderError::FamilyNotLicensed("flux1"))),
            "{built:?}"
        );
        assert_eq!(built.unwrap_err().code(), "family_not_licensed");
        // A licence the service holds for commercial use (or schnell's Apache-2.0) clears it.
        if let Some(f) = platform
            .families
            .iter_mut()
            .find(|f| f.family == ModelFamily::Flux1)
        {
            f.licence = Some(loraplane_crds::platform::Licence {
                name: "apache-2.0".into(),
                commercial_use: true,
            });
        }
        let spec = build_on(&o, &p, &platform).unwrap();
        assert_eq!(spec.base_model.family, ModelFamily::Flux1);
    }

    #[test]
    fn names_are_stable_keyed_and_reveal_nothing() {
        let a = hash_id(b"k1", "session", "cs_123");
        assert_eq!(a, hash_id(b"k1", "session", "cs_123"));
        assert_ne!(a, hash_id(b"k2", "session", "cs_123"));
        assert_ne!(a, hash_id(b"k1", "payment", "cs_123"));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("123"));
        let name = job_name(&a);
        assert_eq!(name.len(), 28);
        assert!(name.starts_with("ltj-"));
    }

    #[test]
    fn upload_ids_parse_strictly() {
        let u = UploadId::parse("eu-west.0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(u.region, "eu-west");
        assert_eq!(
            u.key("acme"),
            "uploads/acme/0123456789abcdef0123456789abcdef.zip"
        );
        assert!(UploadId::parse("eu-west.../../etc").is_none());
        assert!(UploadId::parse("EU.0123456789abcdef0123456789abcdef").is_none());
        assert!(UploadId::parse("eu-west").is_none());
    }

    proptest::proptest! {
        /// Any string parses to an upload id or to nothing; what parses prints back the same.
        #[test]
        fn upload_ids_round_trip_or_are_refused(s in "[a-z0-9A-F.\\-/]{0,80}") {
            if let Some(id) = UploadId::parse(&s) {
                proptest::prop_assert_eq!(id.to_id(), s);
                proptest::prop_assert!(!id.key("acme").contains(".."));
            }
        }
    }
}
