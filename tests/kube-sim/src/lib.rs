//! kube-sim: a Kubernetes API emulator with simulated GPU nodes, for loraplane's tests and
//! demo. See `README.md` for what it emulates and where it differs from a real apiserver.
//!
//! - `apiserver`: the REST API over HTTP on 127.0.0.1 (storage, watch, CRDs, faults).
//! - `cluster`: simulated nodes from a topology file, a scheduler and kubelets, all talking to
//!   the apiserver through a `kube::Client` like kwok does.
//! - `schema`: CRD schema enforcement (pruning, defaulting, validation, CEL).
//! - `logs`: the container logs the kubelets capture and `pods/log` serves.
//!
//! Entry point: `KubeSim::start(SimConfig)`.

pub mod apiserver;
pub mod cluster;
pub mod logs;
pub mod schema;

use std::path::Path;

/// The generated LoRATrainingJob CRD, compiled in.
const LORAPLANE_CRD: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crds/loratrainingjob.yaml"
));

/// Errors of starting or using the emulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The apiserver could not start.
    #[error("starting the apiserver: {0}")]
    StartApiServer(#[from] apiserver::ApiServerError),
    /// The kube client could not be built.
    #[error("building a kube client for {url}: {message}")]
    BuildClient {
        /// The server URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The simulated cluster could not start.
    #[error("starting the simulated cluster: {0}")]
    StartCluster(#[from] cluster::ClusterError),
    /// The kubeconfig could not be written.
    #[error("writing kubeconfig {path}: {source}")]
    WriteKubeconfig {
        /// Where.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    /// Nodes to simulate; `None`: no nodes, no scheduler, no kubelets (apiserver only).
    pub topology: Option<cluster::Topology>,
    /// How kubelets run containers.
    pub kubelet: cluster::KubeletConfig,
    /// CRD objects installed at start.
    pub crds: Vec<serde_json::Value>,
}

impl SimConfig {
    /// Adds loraplane's generated `LoRATrainingJob` CRD (`crds/loratrainingjob.yaml`).
    pub fn with_loraplane_crd(mut self) -> Self {
        match serde_yaml::from_str::<serde_json::Value>(LORAPLANE_CRD) {
            Ok(crd) => self.crds.push(crd),
            // The file is compiled in and checked by this crate's tests.
            Err(e) => tracing::error!(error = %e, "crds/loratrainingjob.yaml does not parse"),
        }
        self
    }
}

/// A running emulator: the apiserver and, with a topology, the simulated cluster.
pub struct KubeSim {
    server: apiserver::ApiServer,
    client: kube::Client,
    cluster: Option<cluster::Cluster>,
    logs: logs::PodLogs,
}

impl std::fmt::Debug for KubeSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSim")
            .field("url", &self.url())
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// Selects rustls' ring provider for the whole process (kube links rustls with ring, the S3
/// SDK with aws-lc-rs; with both in one test binary rustls will not choose). Idempotent.
pub fn install_crypto_provider() {
    // Err only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A `kube::Client` for a plain-HTTP emulator URL.
pub fn client_for(url: &str) -> Result<kube::Client, SimError> {
    client_with_agent(url, None)
}

/// A `kube::Client` for a plain-HTTP emulator URL that sends this `User-Agent` on every
/// request, so the audit log (`KubeSim::audit`) can tell components apart.
pub fn client_with_agent(url: &str, user_agent: Option<&str>) -> Result<kube::Client, SimError> {
    let err = |message: String| SimError::BuildClient {
        url: url.to_string(),
        message,
    };
    install_crypto_provider();
    let uri: axum::http::Uri = url.parse().map_err(|e| err(format!("{e}")))?;
    let mut config = kube::Config::new(uri);
    config.default_namespace = "default".to_string();
    config.read_timeout = None;
    if let Some(agent) = user_agent {
        let value = axum::http::HeaderValue::from_str(agent).map_err(|e| err(e.to_string()))?;
        config.headers.push((axum::http::header::USER_AGENT, value));
    }
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// The kubeconfig text for a server URL: no TLS, no auth, namespace `default`.
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {url}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\nusers:\n- name: kube-sim\n  user: {{}}\npreferences: {{}}\n"
    )
}

impl KubeSim {
    /// Starts the apiserver on 127.0.0.1 (free port), installs the CRDs and, with a topology,
    /// starts the simulated cluster.
    pub async fn start(config: SimConfig) -> Result<KubeSim, SimError> {
        // Tests build their own clients after this; give them a TLS provider too.
        install_crypto_provider();
        let logs = logs::PodLogs::default();
        let server = apiserver::ApiServer::start(&config.crds, logs.clone()).await?;
        let client = client_for(&server.url())?;
        let cluster = match config.topology {
            Some(topology) => Some(
                cluster::Cluster::start(client.clone(), topology, config.kubelet, logs.clone())
                    .await?,
            ),
            None => None,
        };
        Ok(KubeSim {
            server,
            client,
            cluster,
            logs,
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A `kube::Client` talking to the emulator over HTTP.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Writes a kubeconfig for `kubectl --kubeconfig` / `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), SimError> {
        std::fs::write(path, kubeconfig_yaml(&self.url())).map_err(|source| {
            SimError::WriteKubeconfig {
                path: path.display().to_string(),
                source,
            }
        })
    }

    /// A new `kube::Client` sending `User-Agent: {user_agent}`, for telling components apart
    /// in the audit log.
    pub fn client_as(&self, user_agent: &str) -> Result<kube::Client, SimError> {
        client_with_agent(&self.url(), Some(user_agent))
    }

    /// The request audit log: off until `sim.audit().enable()`, then every resource request
    /// with its User-Agent, RBAC verb, group, resource, subresource and namespace.
    pub fn audit(&self) -> &apiserver::audit::Audit {
        self.server.audit()
    }

    /// Fault injection (error rate, latency, apiserver restart).
    pub fn faults(&self) -> &apiserver::Faults {
        self.server.faults()
    }

    /// The simulated cluster, when started with a topology.
    pub fn cluster(&self) -> Option<&cluster::Cluster> {
        self.cluster.as_ref()
    }

    /// The container log store behind `pods/log`.
    pub fn logs(&self) -> logs::PodLogs {
        self.logs.clone()
    }

    /// The apiserver (direct access to storage, for benchmarks and white-box tests).
    pub fn apiserver(&self) -> &apiserver::ApiServer {
        &self.server
    }

    /// Stops the cluster and the apiserver.
    pub async fn shutdown(self) {
        drop(self.cluster);
        self.server.shutdown().await;
    }
}
