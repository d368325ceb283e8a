//! Shared harness of the operator's kube-sim tests: a small topology, the matching platform
//! configuration, an in-process operator that can be stopped and restarted, and polling
//! helpers. Every wait is bounded; a test fails with the job's status when it times out.

#![allow(dead_code, unused_imports)] // each test binary uses part of this harness

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use kube_sim::cluster::{KubeletConfig, Script, ScriptRule, Topology};
use kube_sim::{KubeSim, SimConfig};
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::platform::PlatformConfig;
use loraplane_operator::config::Settings;
use loraplane_operator::controller::{self, Health};
use loraplane_operator::metrics::Metrics;
use loraplane_runtime::storage::{S3Credentials, Storage};
use loraplane_testkit::{Cluster, Family, Platform};
pub use loraplane_testkit::{condition, phase};
use tokio::sync::watch;

pub const NS: &str = "default";

/// Two EEA regions and one US region ([`Cluster::three_regions`]). `eu-west-l4` is the
/// cheapest on-demand pool; its nodes carry a `maintenance` taint the platform does not
/// tolerate when `tainted_cheap_pool` is set, so pods sent there stay unschedulable (the
/// capacity-failover scenario).
pub fn topology(tainted_cheap_pool: bool) -> Topology {
    Cluster::three_regions(tainted_cheap_pool)
        .topology()
        .unwrap()
}

/// The platform configuration matching `topology`; `image` is every family's trainer image
/// (kubelet scripts are chosen by image).
pub fn platform(image: &str, scheduling_timeout: u64) -> PlatformConfig {
    platform_with_s3(image, scheduling_timeout, "http://127.0.0.1:8333")
}

/// `platform` with every region's S3 at `endpoint` (a SeaweedFS the test started).
pub fn platform_with_s3(image: &str, scheduling_timeout: u64, endpoint: &str) -> PlatformConfig {
    let mut p = Platform::new(endpoint);
    p.corpus = true;
    p.families = Family::sdxl_and_sd15("/models", image);
    p.defaults = Some(serde_json::json!({
        "schedulingTimeoutSeconds": scheduling_timeout,
        "backoffSeconds": 0,
        "checkpointEvery": 10,
    }));
    Cluster::three_regions(false).platform(&p).unwrap()
}

/// A script printing a checkpoint line at start and `steps` progress lines over `duration`.
pub fn script(image: &str, duration: Option<Duration>, exit_code: i32, steps: u64) -> ScriptRule {
    ScriptRule {
        image: image.into(),
        script: Script {
            duration,
            exit_code,
            progress_steps: steps,
            log_lines: vec![
                loraplane_crds::trainer::TrainerEvent::Checkpoint {
                    step: 40,
                    uri: "s3://checkpoints-eu-west/default/job/step-40".into(),
                }
                .to_line(),
            ],
            termination_message: None,
        },
    }
}

pub async fn start_sim(topology: Topology, scripts: Vec<ScriptRule>) -> KubeSim {
    KubeSim::start(
        SimConfig {
            topology: Some(topology),
            kubelet: KubeletConfig {
                scripts,
                shutdown_grace_period: Duration::from_millis(200),
                ..KubeletConfig::default()
            },
            crds: vec![],
        }
        .with_loraplane_crd(),
    )
    .await
    .unwrap()
}

/// An operator running in this process.
pub struct Operator {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), controller::RunError>>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
}

/// S3 for an operator whose test never deletes data: the platform's endpoints, where nothing
/// listens (a deletion there fails, visibly, rather than passing unnoticed).
pub fn storage_without_s3(platform: &PlatformConfig) -> Storage {
    Storage::new(
        platform,
        &S3Credentials {
            access_key: "none".into(),
            secret_key: "none".into(),
        },
    )
}

impl Operator {
    pub fn start(client: Client, platform: PlatformConfig, identity: &str) -> Operator {
        let storage = storage_without_s3(&platform);
        Operator::start_with(client, platform, storage, identity)
    }

    pub fn start_with(
        client: Client,
        platform: PlatformConfig,
        storage: Storage,
        identity: &str,
    ) -> Operator {
        Operator::start_configured(client, Settings::for_tests(platform, NS, identity), storage)
    }

    pub fn start_configured(client: Client, settings: Settings, storage: Storage) -> Operator {
        let metrics = Metrics::new().unwrap();
        let health = Arc::new(Health::default());
        let (stop, rx) = watch::channel(false);
        let (m, h) = (metrics.clone(), health.clone());
        // A replica that loses its Lease exits and the kubelet starts it again; on a loaded
        // machine with a 3 s test Lease that can happen in any test, so the harness restarts
        // it the same way.
        let task = tokio::spawn(async move {
            loop {
                let run = controller::run(
                    client.clone(),
                    settings.clone(),
                    storage.clone(),
                    m.clone(),
                    h.clone(),
                    rx.clone(),
                );
                match run.await {
                    Err(controller::RunError::LostLeadership) if !*rx.borrow() => {
                        tracing::warn!("lost the Lease; restarting the replica");
                    }
                    done => return done,
                }
            }
        });
        Operator {
            stop,
            task,
            metrics,
            health,
        }
    }

    /// Graceful shutdown: in-flight reconciles finish, the Lease is released.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let result = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("operator stops within 20 s")
            .unwrap();
        result.unwrap();
    }
}

pub fn job(name: &str, extra: serde_json::Value) -> LoRATrainingJob {
    let mut spec = serde_json::json!({
        "baseModel": {"family": "sdxl"},
        "concept": {"type": "character", "triggerWord": "zxqsecret", "description": "a private description"},
        "dataset": {"uri": "s3://datasets-eu-west/d.zip", "sha256": "a".repeat(64)},
        "training": {"steps": 100},
        "placement": {"residency": "eea"},
    });
    if let (Some(base), Some(more)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            base.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoRATrainingJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }))
    .unwrap()
}

pub async fn create_job(client: &Client, job: &LoRATrainingJob) -> LoRATrainingJob {
    Api::<LoRATrainingJob>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), job)
        .await
        .unwrap()
}

/// Waits until `pred` holds for job `name` in [`NS`]; panics with its status after `timeout`.
pub async fn wait_job(
    client: &Client,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&LoRATrainingJob) -> bool,
) -> LoRATrainingJob {
    loraplane_testkit::wait_job(client, NS, name, timeout, what, pred).await
}

pub async fn pods_of(client: &Client, job: &LoRATrainingJob) -> Vec<Pod> {
    let uid = job.metadata.uid.clone().unwrap();
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("loraplane.io/job-uid={uid}")))
        .await
        .unwrap()
        .items
}

/// A SeaweedFS holding every bucket of `platform_with_s3`, for the tests that delete data.
pub struct S3 {
    pub fs: seaweed::SeaweedFs,
}

pub const BUCKET_REGIONS: [&str; 3] = ["eu-west", "eu-north", "us-east"];
pub const BUCKET_KINDS: [&str; 4] = ["datasets", "checkpoints", "outputs", "corpus"];

impl S3 {
    pub async fn start() -> S3 {
        let fs = seaweed::SeaweedFs::start()
            .await
            .expect("SeaweedFS starts (`weed` comes from `make bootstrap`)");
        for region in BUCKET_REGIONS {
            for kind in BUCKET_KINDS {
                fs.create_bucket(&format!("{kind}-{region}")).await.unwrap();
            }
        }
        S3 { fs }
    }

    pub fn platform(&self, image: &str, scheduling_timeout: u64) -> PlatformConfig {
        platform_with_s3(image, scheduling_timeout, self.fs.endpoint())
    }

    pub fn storage(&self) -> Storage {
        Storage::new(
            &self.platform("unused", 30),
            &S3Credentials {
                access_key: self.fs.access_key().into(),
                secret_key: self.fs.secret_key().into(),
            },
        )
    }

    pub async fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        self.fs
            .client()
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.to_vec().into())
            .send()
            .await
            .unwrap();
    }

    /// Every object left, as `bucket/key`.
    pub async fn keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        for region in BUCKET_REGIONS {
            for kind in BUCKET_KINDS {
                let bucket = format!("{kind}-{region}");
                let list = self
                    .fs
                    .client()
                    .list_objects_v2()
                    .bucket(&bucket)
                    .send()
                    .await
                    .unwrap();
                for o in list.contents() {
                    out.push(format!("{bucket}/{}", o.key().unwrap_or_default()));
                }
            }
        }
        out
    }

    /// Puts a job's data where the trainer would: the dataset, two checkpoints and the LoRA.
    pub async fn seed_job(&self, job: &LoRATrainingJob) {
        let ns = job.metadata.namespace.as_deref().unwrap();
        let prefix = loraplane_crds::layout::job_prefix(
            ns,
            job.metadata.name.as_deref().unwrap(),
            job.metadata.uid.as_deref().unwrap(),
        );
        let (bucket, key) = job
            .spec
            .dataset
            .uri
            .strip_prefix("s3://")
            .unwrap()
            .split_once('/')
            .unwrap();
        self.put(bucket, key, b"zip").await;
        self.put(
            "checkpoints-eu-west",
            &format!("{prefix}step-40/state"),
            b"ckpt",
        )
        .await;
        self.put(
            "checkpoints-eu-north",
            &format!("{prefix}step-80/state"),
            b"ckpt",
        )
        .await;
        self.put(
            "outputs-eu-west",
            &format!("{prefix}lora.safetensors"),
            b"lora",
        )
        .await;
    }
}

/// The audit record of a deleted job (by the hash of its uid), waiting for it a little.
pub async fn audit_record(
    client: &Client,
    uid: &str,
) -> std::collections::BTreeMap<String, String> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let want = loraplane_operator::audit::uid_hash(uid);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = api
            .list(&ListParams::default().labels("loraplane.io/record=job-audit"))
            .await
            .unwrap();
        if let Some(data) = list
            .items
            .into_iter()
            .filter_map(|c| c.data)
            .find(|d| d.get("jobUidSha256") == Some(&want))
        {
            return data;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no audit record for {uid}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A job's life with S3: kube-sim running `script`'s image, a SeaweedFS with every bucket,
/// and an operator that deletes there.
pub async fn start_with_s3(script: ScriptRule) -> (KubeSim, Client, S3, Operator) {
    let image = script.image.clone();
    let sim = start_sim(topology(false), vec![script]).await;
    let client = sim.client();
    let s3 = S3::start().await;
    let op = Operator::start_with(
        client.clone(),
        s3.platform(&image, 30),
        s3.storage(),
        "op-a",
    );
    (sim, client, s3, op)
}

/// Creates `job(name, extra)` and waits until it trains.
pub async fn create_running(
    client: &Client,
    name: &str,
    extra: serde_json::Value,
) -> LoRATrainingJob {
    let created = create_job(client, &job(name, extra)).await;
    wait_job(client, name, Duration::from_secs(20), "Running", |j| {
        phase(j) == Some("Running")
    })
    .await;
    created
}
