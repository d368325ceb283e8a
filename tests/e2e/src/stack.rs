//! The whole product on one machine: kube-sim with the three-region topology and the CRD,
//! simulated kubelets that run the real `loraplane-trainer` binary for the trainer image, a
//! real SeaweedFS with each region's buckets, the operator and any number of API replicas.
//! The customer-side calls (upload, signed Stripe webhook, API requests) and auditor-side
//! looks (pods, claims, S3 objects, Events) are the stack's [`Endpoints`], which it derefs to;
//! what only a simulated cluster can do (preempt a node, fill a pool) stays here.
//!
//! The operator and the API run in this process through their library crates rather than as
//! their binaries: a scenario can stop and start them at will (operator restart, API replica
//! crash), both use exactly the code their binaries run (`controller::run`; the API's router,
//! handlers), start in milliseconds without a second build, and die
//! with the test process, so nothing is left running. The trainer, by contrast, runs as the
//! real binary in its own process, as it would in its container: the kubelet starts it, reads
//! its stdout and termination message, and kills it on preemption.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};
use kube_sim::cluster::{KubeletConfig, LocalImage, Script, ScriptRule};
use kube_sim::{KubeSim, SimConfig};
use loraplane_api::app::{App, Secrets};
use loraplane_api::config::ApiConfig;
use loraplane_api::http::{HttpState, router};
use loraplane_crds::platform::PlatformConfig;
use loraplane_operator::config::Settings;
use loraplane_operator::controller::{self, Health};
use loraplane_runtime::storage::{S3Credentials, Storage};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{
    self, ORDERS_NS, PlatformKnobs, RetentionKnobs, STOREFRONT_TOKEN, SYSTEM_NS, TRAINER_IMAGE,
    WEBHOOK_SECRET,
};
use crate::endpoints::{Endpoints, kube_err};
use crate::fixtures;
use crate::http::HttpError;

/// Why the stack could not start or a call on it failed.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A configuration could not be built.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A fixture could not be made.
    #[error(transparent)]
    Fixture(#[from] fixtures::FixtureError),
    /// The trainer binary is missing.
    #[error(transparent)]
    TrainerBinary(#[from] crate::trainer_bin::TrainerBinError),
    /// The scratch directory could not be created.
    #[error("create the stack's temp dir: {0}")]
    CreateTempDir(std::io::Error),
    /// kube-sim did not start.
    #[error("start kube-sim: {0}")]
    StartKubeSim(#[from] kube_sim::SimError),
    /// SeaweedFS did not start.
    #[error("start SeaweedFS: {0}")]
    StartSeaweed(#[from] seaweed::SeaweedError),
    /// The Stripe simulator did not start.
    #[error("start the Stripe simulator: {0}")]
    StartStripe(#[from] stripe_sim::SimError),
    /// A Kubernetes call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// Why.
        source: kube::Error,
    },
    /// An S3 call failed.
    #[error("{action}: {message}")]
    S3 {
        /// What was being done.
        action: &'static str,
        /// Why.
        message: String,
    },
    /// An HTTP exchange failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The API refused a call it should accept.
    #[error("{action}: HTTP {status}: {body}")]
    ApiRefused {
        /// What was being done.
        action: &'static str,
        /// Status.
        status: u16,
        /// Body.
        body: String,
    },
    /// The API replica could not start.
    #[error("start an API replica: {0}")]
    StartApi(String),
    /// The operator did not stop in time or failed.
    #[error("stop the operator: {0}")]
    StopOperator(String),
    /// No API replica is running.
    #[error("no API replica is running")]
    NoApi,
    /// A wait ran out.
    #[error("timed out after {secs} s waiting for {what}; last seen: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
        /// The last observation.
        last: String,
    },
}

/// An image the kubelets run as a scripted container that never ends: other tenants'
/// workloads holding GPUs (see [`Stack::occupy_pool`]).
pub const HOG_IMAGE: &str = "registry.local/other-team/gpu-job:1";

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Operator knobs in the platform configuration.
    pub platform: PlatformKnobs,
    /// Retention periods of the API's plans.
    pub retention: RetentionKnobs,
    /// Upper bound of a preempted pod's grace period.
    pub shutdown_grace: Duration,
    /// Start the operator.
    pub operator: bool,
    /// API replicas to start.
    pub api_replicas: usize,
    /// Keep the working directory (kubeconfig, models, kubelet volumes) at this path instead of
    /// a temporary directory removed on shutdown.
    pub work_dir: Option<PathBuf>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            platform: PlatformKnobs::default(),
            retention: RetentionKnobs::default(),
            shutdown_grace: Duration::from_secs(2),
            operator: true,
            api_replicas: 1,
            work_dir: None,
        }
    }
}

struct OperatorHandle {
    identity: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), controller::RunError>>,
}

/// One API replica running in this process.
struct ApiReplica {
    identity: String,
    url: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiReplica {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

enum WorkDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl WorkDir {
    fn path(&self) -> &Path {
        match self {
            WorkDir::Temp(t) => t.path(),
            WorkDir::Kept(p) => p,
        }
    }
}

/// The running stack. [`Stack::shutdown`] (or dropping it) stops everything it started.
pub struct Stack {
    /// The Kubernetes API emulator and its simulated cluster.
    pub sim: KubeSim,
    /// SeaweedFS.
    pub s3: seaweed::SeaweedFs,
    /// Stripe's Refunds API, simulated.
    pub stripe: stripe_sim::StripeSim,
    /// The storefront: receives the API's signed notifications and verifies them.
    pub storefront: stripe_sim::storefront::Storefront,
    /// The platform configuration the operator and the API share.
    pub platform: PlatformConfig,
    /// The API's configuration.
    pub api_config: ApiConfig,
    /// The trainer binary the kubelets run.
    pub trainer_binary: PathBuf,
    endpoints: Endpoints,
    dir: WorkDir,
    operator: Option<OperatorHandle>,
    operator_starts: u32,
    apis: Vec<ApiReplica>,
    api_starts: u32,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("kube", &self.sim.url())
            .field("s3", &self.s3.endpoint())
            .finish_non_exhaustive()
    }
}

/// The customer and auditor calls (`stack.upload_dataset(..)`, `stack.job(..)`, ...) are the
/// [`Endpoints`] of the stack, so journey steps written for endpoints take a `&Stack` as well.
impl std::ops::Deref for Stack {
    type Target = Endpoints;

    fn deref(&self) -> &Endpoints {
        &self.endpoints
    }
}

impl Stack {
    /// Starts everything: trainer binary, tiny models, SeaweedFS and buckets, kube-sim with
    /// nodes and kubelets, namespaces and the S3 credentials Secret, the operator and the API.
    pub async fn start(opts: StackOptions) -> Result<Stack, StackError> {
        loraplane_runtime::tls::install_crypto_provider();
        let trainer_binary = crate::trainer_bin::trainer_binary().await?;
        let dir = match &opts.work_dir {
            Some(p) => {
                std::fs::create_dir_all(p).map_err(StackError::CreateTempDir)?;
                WorkDir::Kept(p.clone())
            }
            None => WorkDir::Temp(
                tempfile::Builder::new()
                    .prefix("loraplane-e2e-")
                    .tempdir_in(base_dir())
                    .map_err(StackError::CreateTempDir)?,
            ),
        };
        // The kubelets rewrite every occurrence of a container mount path (`/work`, `/tmp`,
        // ...) in argv and config files to a host directory, so host paths the trainer sees
        // (its own executable, the model weights) must not start with one: they live in the
        // work dir (under /var/tmp), the executable as a symlink.
        let trainer_link = dir.path().join("loraplane-trainer");
        std::os::unix::fs::symlink(&trainer_binary, &trainer_link)
            .map_err(StackError::CreateTempDir)?;
        let models = dir.path().join("models");
        let models_task = {
            let models = models.clone();
            tokio::task::spawn_blocking(move || fixtures::write_models(&models))
        };
        let s3 = seaweed::SeaweedFs::start().await?;
        let stripe = stripe_sim::StripeSim::start().await?;
        let storefront =
            stripe_sim::storefront::Storefront::start(config::NOTIFY_SECRET.as_bytes()).await?;
        for b in config::all_buckets() {
            s3.create_bucket(&b).await?;
        }
        models_task
            .await
            .map_err(|e| StackError::StartApi(format!("model writer panicked: {e}")))??;
        let platform = config::platform(s3.endpoint(), s3.region(), &models, &opts.platform)?;
        let api_config = config::api_config(&opts.retention, Some(&storefront.url()))?;
        let sim = KubeSim::start(SimConfig {
            topology: Some(config::topology()?),
            kubelet: KubeletConfig {
                data_dir: Some(dir.path().join("kubelet")),
                local_images: vec![LocalImage {
                    image: TRAINER_IMAGE.into(),
                    entrypoint: vec![trainer_link.display().to_string()],
                }],
                scripts: vec![ScriptRule {
                    image: HOG_IMAGE.into(),
                    script: Script {
                        duration: None,
                        ..Script::default()
                    },
                }],
                shutdown_grace_period: opts.shutdown_grace,
                ..KubeletConfig::default()
            },
            crds: vec![config::crd()?],
        })
        .await?;
        let kubeconfig = dir.path().join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig)?;
        let endpoints = Endpoints::new(
            sim.client(),
            kubeconfig,
            STOREFRONT_TOKEN,
            WEBHOOK_SECRET,
            s3.client(),
            1,
        );
        let mut stack = Stack {
            sim,
            s3,
            stripe,
            storefront,
            platform,
            api_config,
            trainer_binary,
            endpoints,
            dir,
            operator: None,
            operator_starts: 0,
            apis: Vec::new(),
            api_starts: 0,
        };
        stack.prepare_cluster().await?;
        if opts.operator {
            stack.start_operator();
        }
        for _ in 0..opts.api_replicas {
            stack.start_api().await?;
        }
        Ok(stack)
    }

    async fn prepare_cluster(&self) -> Result<(), StackError> {
        let client = self.client();
        let nss: Api<Namespace> = Api::all(client.clone());
        for ns in [ORDERS_NS, SYSTEM_NS] {
            let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))
                .map_err(|e| StackError::StartApi(e.to_string()))?;
            match nss.create(&PostParams::default(), &obj).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(kube_err("create namespace")(e)),
            }
        }
        Ok(())
    }

    /// S3 of every region, with the stack's credentials (the operator's and the API's).
    fn storage(&self) -> Storage {
        Storage::new(
            &self.platform,
            &S3Credentials {
                access_key: self.s3.access_key().into(),
                secret_key: self.s3.secret_key().into(),
            },
        )
    }

    /// The stack's working directory.
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The simulated cluster.
    pub fn cluster(&self) -> Result<&kube_sim::cluster::Cluster, StackError> {
        self.sim
            .cluster()
            .ok_or_else(|| StackError::StartApi("kube-sim started without a cluster".into()))
    }

    // ---- operator ----

    /// Starts an operator replica (a new identity each time).
    pub fn start_operator(&mut self) {
        self.operator_starts += 1;
        let identity = format!("loraplane-operator-{}", self.operator_starts);
        let settings = Settings::for_tests(self.platform.clone(), SYSTEM_NS, &identity);
        let storage = self.storage();
        let (stop, rx) = watch::channel(false);
        let client = self.client();
        let task = tokio::spawn(async move {
            let metrics = loraplane_operator::metrics::Metrics::new()
                .map_err(|e| {
                    tracing::error!(error = %e, "operator metrics");
                })
                .ok();
            match metrics {
                Some(m) => {
                    controller::run(
                        client,
                        settings,
                        storage,
                        m,
                        Arc::new(Health::default()),
                        rx,
                    )
                    .await
                }
                None => Ok(()),
            }
        });
        self.operator = Some(OperatorHandle {
            identity,
            stop,
            task,
        });
    }

    /// The running operator's identity.
    pub fn operator_identity(&self) -> Option<&str> {
        self.operator.as_ref().map(|o| o.identity.as_str())
    }

    /// Stops the operator the way a rolling update does (SIGTERM): in-flight reconciles finish
    /// and the Lease is released.
    pub async fn stop_operator(&mut self) -> Result<(), StackError> {
        let Some(op) = self.operator.take() else {
            return Ok(());
        };
        op.stop.send_replace(true);
        match tokio::time::timeout(Duration::from_secs(20), op.task).await {
            Err(_) => Err(StackError::StopOperator("did not stop within 20 s".into())),
            Ok(Err(e)) => Err(StackError::StopOperator(e.to_string())),
            Ok(Ok(Err(e))) => Err(StackError::StopOperator(e.to_string())),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    // ---- API replicas ----

    /// Starts an API replica on a free loopback port; returns its base URL.
    pub async fn start_api(&mut self) -> Result<String, StackError> {
        self.api_starts += 1;
        let identity = format!("loraplane-api-{}", self.api_starts);
        let client = self.client();
        let storage = self.storage();
        let app = Arc::new(App {
            kube: client.clone(),
            storage,
            config: self.api_config.clone(),
            platform: self.platform.clone(),
            secrets: Secrets {
                webhook: vec![WEBHOOK_SECRET.as_bytes().to_vec()],
                id_key: config::ID_HASH_KEY.as_bytes().to_vec(),
                notify: self
                    .api_config
                    .tenants
                    .iter()
                    .filter(|t| t.notifications.is_some())
                    .map(|t| (t.name.clone(), config::NOTIFY_SECRET.as_bytes().to_vec()))
                    .collect(),
            },
            metrics: loraplane_api::metrics::Metrics::new()
                .map_err(|e| StackError::StartApi(e.to_string()))?,
            validations: App::validation_permits(&self.api_config),
            stripe: loraplane_api::refunds::Stripe::new(
                &self.stripe.url(),
                stripe_sim::SECRET_KEY,
                Duration::from_secs(self.api_config.stripe_api.timeout_seconds),
            )
            .map_err(|e| StackError::StartApi(e.to_string()))?,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| StackError::StartApi(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StackError::StartApi(e.to_string()))?;
        let svc =
            router(HttpState::new(app.clone())).into_make_service_with_connect_info::<SocketAddr>();
        // As `loraplane-api` runs it: the HTTP surface and the notifier.
        let notifier = loraplane_api::notifier::Notifier::new(app.clone(), &identity)
            .map_err(|e| StackError::StartApi(e.to_string()))?;
        let tasks = vec![
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, svc).await {
                    tracing::error!(error = %e, "API replica stopped serving");
                }
            }),
            tokio::spawn(Arc::new(notifier).run()),
        ];
        let url = format!("http://{addr}");
        self.apis.push(ApiReplica {
            identity,
            url: url.clone(),
            tasks,
        });
        self.publish_api_urls();
        Ok(url)
    }

    /// Kills the oldest API replica at once (a crash: no lease release, open requests cut).
    /// Returns its identity.
    pub fn kill_api(&mut self) -> Option<String> {
        if self.apis.is_empty() {
            return None;
        }
        let r = self.apis.remove(0);
        self.publish_api_urls();
        Some(r.identity.clone())
    }

    fn publish_api_urls(&self) {
        self.endpoints
            .set_api_urls(self.apis.iter().map(|r| r.url.clone()).collect());
    }

    /// Identities of the live API replicas.
    pub fn api_identities(&self) -> Vec<String> {
        self.apis.iter().map(|r| r.identity.clone()).collect()
    }

    /// Fills every GPU of a pool with another team's never-ending pods (in namespace
    /// `SYSTEM_NS`); returns their names once they run.
    pub async fn occupy_pool(&self, pool: &str) -> Result<Vec<String>, StackError> {
        let topo = config::topology()?;
        let (_, p) = topo
            .pool(pool)
            .ok_or_else(|| StackError::StartApi(format!("no pool {pool}")))?;
        let api = Api::<Pod>::namespaced(self.client(), SYSTEM_NS);
        let mut names = Vec::new();
        for i in 0..(p.nodes * p.gpus_per_node) {
            let name = format!("hog-{pool}-{i}");
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": SYSTEM_NS},
                "spec": {
                    "nodeSelector": {"loraplane.io/node-pool": pool},
                    "tolerations": [{"key": "loraplane.io/spot", "operator": "Exists"}],
                    "containers": [{
                        "name": "work", "image": HOG_IMAGE,
                        "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
                    }]
                }
            }))
            .map_err(|e| StackError::StartApi(e.to_string()))?;
            api.create(&PostParams::default(), &pod)
                .await
                .map_err(kube_err("create a GPU hog pod"))?;
            names.push(name);
        }
        for n in &names {
            let api = api.clone();
            self.wait_for(Duration::from_secs(30), &format!("pod {n} running"), || {
                let api = api.clone();
                let n = n.clone();
                async move {
                    let p = api.get(&n).await.map_err(kube_err("get hog pod"))?;
                    let ph = p.status.and_then(|s| s.phase).unwrap_or_default();
                    Ok((ph == "Running").then_some(()))
                }
            })
            .await?;
        }
        Ok(names)
    }

    /// Deletes one of [`Stack::occupy_pool`]'s pods.
    pub async fn free_gpu(&self, hog: &str) -> Result<(), StackError> {
        Api::<Pod>::namespaced(self.client(), SYSTEM_NS)
            .delete(hog, &kube::api::DeleteParams::default())
            .await
            .map_err(kube_err("delete a GPU hog pod"))?;
        Ok(())
    }

    /// Stops everything this stack started.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.stop_operator().await {
            tracing::warn!(error = %e, "operator did not stop cleanly");
        }
        // Wait for the aborted replica tasks to be gone before the apiserver goes away, so no
        // request of theirs is left to fail (and log) against a closed port.
        for mut replica in std::mem::take(&mut self.apis) {
            for task in std::mem::take(&mut replica.tasks) {
                task.abort();
                let _ = task.await;
            }
        }
        self.publish_api_urls();
        let Stack { sim, s3, dir, .. } = self;
        sim.shutdown().await;
        drop(s3);
        drop(dir);
    }
}

/// Where stacks put their working directories: `LORAPLANE_E2E_DIR`, else `/var/tmp` (not
/// `/tmp`: see the path-rewriting note in `Stack::start`).
pub fn base_dir() -> PathBuf {
    std::env::var_os("LORAPLANE_E2E_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// The job name the API gives a Stripe checkout session (a keyed hash of the session id).
pub fn job_name_for_session(session_id: &str) -> String {
    let hash = loraplane_api::order::hash_id(config::ID_HASH_KEY.as_bytes(), "session", session_id);
    loraplane_api::order::job_name(&hash)
}
