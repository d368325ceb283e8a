//! Names more than one crate relies on, defined once: the label keys on jobs, their children
//! and the records that outlive them, and where a job's data lies in S3 (down to the names of
//! its checkpoint and LoRA files). The operator writes
//! by these names, the API and the trainer read by them, and cleanup deletes by them, so a
//! rename here is a rename everywhere.

/// Label marking every object a loraplane component creates (`app.kubernetes.io/managed-by`).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label naming what a pod is (`app.kubernetes.io/component`); the chart's NetworkPolicies
/// select pods by it.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Value of [`LABEL_COMPONENT`] on trainer pods.
pub const TRAINER_COMPONENT: &str = "trainer";

/// Label holding a child's job name.
pub const LABEL_JOB: &str = "loraplane.io/job";
/// Label holding a child's job uid (what the operator selects a job's pods by).
pub const LABEL_JOB_UID: &str = "loraplane.io/job-uid";
/// Label holding the pool of a pod.
pub const LABEL_POOL: &str = "loraplane.io/pool";
/// Label holding the region of a pod or claim.
pub const LABEL_REGION: &str = "loraplane.io/region";
/// Label on a job: the keyed hash of the order it was created for.
pub const LABEL_ORDER: &str = "loraplane.io/order";
/// Label on a job: the keyed hash of the payment that paid for it.
pub const LABEL_PAYMENT: &str = "loraplane.io/payment";
/// Annotation the API keeps on a paid job it refunded after the job ended badly:
/// `<reason>/<state>` (`jobFailed/pending`, `jobCancelled/succeeded`), no payment ids. The
/// operator copies it into the job's audit record.
pub const ANNOTATION_REFUND: &str = "loraplane.io/refund";

/// The value of [`ANNOTATION_REFUND`] for a refund's reason and state.
pub fn refund_annotation(reason: &str, state: &str) -> String {
    format!("{reason}/{state}")
}

/// The reason and state an [`ANNOTATION_REFUND`] value records, if it has the shape
/// [`refund_annotation`] writes (two words of letters): anything else is not ours.
pub fn parse_refund_annotation(value: &str) -> Option<(&str, &str)> {
    let (reason, state) = value.split_once('/')?;
    let word =
        |s: &str| !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphabetic());
    (word(reason) && word(state)).then_some((reason, state))
}

/// Label on an audit record: which kind of record it is (see [`AUDIT_RECORD`]).
pub const LABEL_RECORD: &str = "loraplane.io/record";
/// Value of [`LABEL_RECORD`] on the audit record a deleted job leaves behind.
pub const AUDIT_RECORD: &str = "job-audit";

/// Value of [`LABEL_RECORD`] on an upload's claim: the Lease that marks an upload as consumed
/// by one order (held by the order's hash; see [`upload_claim_name`]).
pub const UPLOAD_CLAIM_RECORD: &str = "upload-claim";

/// The name of the claim on the upload at `dataset_uri` (`s3://bucket/uploads/<ns>/<token>.zip`),
/// in the job's namespace. The API creates it before the order's job, so a second order on the
/// same upload is refused; the operator deletes it with the job's data. A SHA-256 of the URI:
/// the token is random, so the name says nothing of it, and both sides derive it alone.
pub fn upload_claim_name(dataset_uri: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(dataset_uri.as_bytes()));
    format!("ltj-upload-{}", &digest[..40])
}

/// The finalizer that guards a job's data in S3: the job object stays until its data is gone.
pub const DATA_FINALIZER: &str = "loraplane.io/data";

/// The key prefix, inside the checkpoints and outputs buckets, of everything one job writes:
/// `<namespace>/<name>-<uid>/`. The uid keeps a recreated job of the same name apart.
pub fn job_prefix(namespace: &str, name: &str, uid: &str) -> String {
    format!("{namespace}/{name}-{uid}/")
}

/// The key prefix, inside each region's dataset bucket, of uploads not yet ordered and of the
/// datasets orders consume: `uploads/<namespace>/<token>.zip`.
pub const UPLOADS_PREFIX: &str = "uploads/";

/// The key of an upload in its region's dataset bucket. Namespaced, so a tenant can only
/// ever reach its own uploads.
pub fn upload_key(namespace: &str, token: &str) -> String {
    format!("{UPLOADS_PREFIX}{namespace}/{token}.zip")
}

/// Where draft orders (everything a customer chose, before payment) wait in the dataset bucket
/// of the region their upload is in: `drafts/<namespace>/<token>.json`. Customer text, so in
/// the residency's region like the upload, and deleted with unconsumed uploads after
/// `defaults.uploadTtlSeconds`.
pub const DRAFTS_PREFIX: &str = "drafts/";

/// The key of a draft order in its region's dataset bucket.
pub fn draft_key(namespace: &str, token: &str) -> String {
    format!("{DRAFTS_PREFIX}{namespace}/{token}.json")
}

/// The `s3://bucket/key` form a job's spec and status use for an object (the inverse of
/// `loraplane_runtime::storage::parse_uri`).
pub fn s3_uri(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

/// The key, in a region's corpus bucket, of the dataset a consenting job copied there; its
/// LoRA files keep their names under the same [`job_prefix`].
pub const CORPUS_DATASET: &str = "dataset.zip";

/// The name of `file` inside a location prefix (`s3://bucket/prefix/` or a directory), with
/// or without its trailing `/`: how the operator's grants and the trainer's config check name
/// the checkpoint and LoRA objects alike.
pub fn object_in(prefix: &str, file: &str) -> String {
    if prefix.ends_with('/') {
        format!("{prefix}{file}")
    } else {
        format!("{prefix}/{file}")
    }
}

/// The one checkpoint object of a job, under its [`job_prefix`] in the checkpoints bucket.
/// Each checkpoint replaces the last: an S3 PUT is atomic, so the object is always a whole
/// checkpoint, and one fixed key is what lets the operator grant the trainer exactly the
/// objects it may write before the trainer knows which steps it will reach.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The LoRA files a job delivers, under its [`job_prefix`] in the outputs bucket, as
/// `(format, file name)`: the kohya file (named after the job, as ComfyUI and Automatic1111
/// list it) and the diffusers/PEFT file under the name `load_lora_weights` looks for.
pub fn output_files(job_name: &str) -> [(&'static str, String); 2] {
    [
        ("kohya", format!("{job_name}.safetensors")),
        ("diffusers", "pytorch_lora_weights.safetensors".to_string()),
    ]
}

/// The sample image of prompt `prompt` (0-based) in the set of training step `step` (0: the
/// base model), under a job's outputs prefix: `samples/step-000250-1.png`. Zero-padded, so the
/// files list in training order.
pub fn sample_file(step: u64, prompt: usize) -> String {
    format!("samples/step-{step:06}-{prompt}.png")
}

/// The contact sheet of every sample set so far, under a job's outputs prefix; each set
/// replaces it (a PUT is atomic, so it is always a whole sheet).
pub const CONTACT_SHEET_FILE: &str = "samples/contact-sheet.png";

/// The training steps a run of `total` steps renders sample sets at: 0 (the base model, before
/// training), every `every` steps (0: none between), and `total`.
pub fn sample_steps(total: u64, every: u64) -> Vec<u64> {
    let mut steps = vec![0];
    if every > 0 {
        steps.extend((1..).map(|k| k * every).take_while(|s| *s < total));
    }
    if total > 0 {
        steps.push(total);
    }
    steps
}

/// The most sample sets a job may have (the CRD refuses an interval that gives more). Each
/// sample file gets a presigned PUT and GET in the trainer's config Secret, whose size is
/// capped at 1 MiB: 50 sets of [`MAX_SAMPLE_PROMPTS`] images are about 800 URLs, 0.6 MB.
pub const MAX_SAMPLE_SETS: usize = 50;

/// The most prompts (images per set) a job's samples may have.
pub const MAX_SAMPLE_PROMPTS: usize = 8;

/// Every sample file of a run (each image, then the contact sheet), as
/// [`sample_steps`] and [`sample_file`] name them.
pub fn sample_files(total: u64, every: u64, prompts: usize) -> Vec<String> {
    let mut files: Vec<String> = sample_steps(total, every)
        .into_iter()
        .flat_map(|step| (0..prompts).map(move |p| sample_file(step, p)))
        .collect();
    files.push(CONTACT_SHEET_FILE.to_string());
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refund_annotation_reads_back_and_nothing_else_does() {
        let v = refund_annotation("jobFailed", "pending");
        assert_eq!(parse_refund_annotation(&v), Some(("jobFailed", "pending")));
        for bad in ["jobFailed", "pi_1/succeeded", "a/b/c", "/x", "a b/c"] {
            assert_eq!(parse_refund_annotation(bad), None, "{bad}");
        }
    }

    #[test]
    fn sample_sets_are_the_base_every_interval_and_the_end() {
        assert_eq!(sample_steps(1000, 250), [0, 250, 500, 750, 1000]);
        assert_eq!(sample_steps(900, 400), [0, 400, 800, 900]);
        assert_eq!(sample_steps(300, 0), [0, 300]);
        assert_eq!(sample_steps(200, 200), [0, 200]);
        let files = sample_files(200, 100, 2);
        assert_eq!(
            files,
            [
                "samples/step-000000-0.png",
                "samples/step-000000-1.png",
                "samples/step-000100-0.png",
                "samples/step-000100-1.png",
                "samples/step-000200-0.png",
                "samples/step-000200-1.png",
                CONTACT_SHEET_FILE,
            ]
        );
    }

    #[test]
    fn the_prefix_keeps_namespace_name_and_uid_apart() {
        assert_eq!(job_prefix("ns", "job", "u-1"), "ns/job-u-1/");
        assert_eq!(upload_key("ns", "ab"), "uploads/ns/ab.zip");
        let claim = upload_claim_name("s3://b/uploads/ns/ab.zip");
        assert_eq!(claim.len(), "ltj-upload-".len() + 40);
        assert!(!claim.contains("ab.zip"));
        assert_ne!(claim, upload_claim_name("s3://b/uploads/ns/ac.zip"));
    }
}
