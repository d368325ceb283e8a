#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `kubectl` against the emulator: apply the sample LoRATrainingJobs, list them with
//! their printer columns, see validation errors, describe, explain, delete, and list the
//! simulated nodes with their region label.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Api;
use kube::api::{ApiResource, DynamicObject};
use kube_sim::{KubeSim, SimConfig};
use loraplane_crds::LoRATrainingJob;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

fn kubectl_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .expect("kubectl not found on PATH: install it (https://kubernetes.io/docs/tasks/tools/, or `apt-get install kubectl` from the Kubernetes apt repository)")
}

struct Kubectl {
    kubeconfig: PathBuf,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn new(sim: &KubeSim, tag: &str) -> Kubectl {
        let kubeconfig =
            std::env::temp_dir().join(format!("kube-sim-{tag}-{}.kubeconfig", std::process::id()));
        sim.write_kubeconfig(&kubeconfig).unwrap();
        Kubectl { kubeconfig }
    }

    async fn run(&self, args: &[&str]) -> Out {
        let out = tokio::process::Command::new(kubectl_binary())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HOME", std::env::temp_dir())
            .output()
            .await
            .unwrap();
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../crds/examples")
        .join(name)
        .display()
        .to_string()
}

#[tokio::test]
async fn kubectl_applies_lists_describes_explains_and_deletes_ltjs() {
    within(async {
        let sim = KubeSim::start(SimConfig::default().with_loraplane_crd()).await.unwrap();
        let k = Kubectl::new(&sim, "ltj");
        let ns = std::env::temp_dir().join(format!("kube-sim-ns-{}.yaml", std::process::id()));
        std::fs::write(&ns, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: tenant-acme\n").unwrap();
        assert!(k.ok(&["create", "-f", &ns.display().to_string()]).await.contains("namespace/tenant-acme created"));
        let _ = std::fs::remove_file(&ns);
        for f in ["minimal.yaml", "full.yaml", "zero-retention-eea.yaml"] {
            let out = k.ok(&["apply", "-f", &example(f)]).await;
            assert!(out.contains("created"), "{out}");
        }
        assert!(k.ok(&["apply", "-f", &example("minimal.yaml")]).await.contains("unchanged"));

        let table = k.ok(&["get", "ltj", "-A"]).await;
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAMESPACE", "NAME", "PHASE", "MODEL", "REGION", "PROGRESS", "AGE"]);
        assert_eq!(table.lines().count(), 4, "{table}");
        let minimal = table.lines().find(|l| l.contains(" minimal ")).unwrap();
        assert!(minimal.contains("sd15"), "{minimal}");

        let bad = k.run(&["apply", "-f", &example("invalid/zero-steps.yaml")]).await;
        assert!(!bad.ok);
        assert!(
            bad.stderr.contains("spec.training.steps: Invalid value: 0: spec.training.steps in body should be greater than or equal to 1"),
            "{}",
            bad.stderr
        );

        let described = k.ok(&["describe", "ltj", "minimal"]).await;
        assert!(described.contains("Name:         minimal"), "{described}");
        assert!(described.contains("Family:  sd15"), "{described}");
        let explained = k.ok(&["explain", "ltj.spec.training"]).await;
        assert!(explained.contains("steps"), "{explained}");

        let deleted = k.ok(&["delete", "-f", &example("minimal.yaml")]).await;
        assert!(deleted.contains("deleted"), "{deleted}");
        let jobs: Api<DynamicObject> =
            Api::namespaced_with(sim.client(), "default", &ApiResource::erase::<LoRATrainingJob>(&()));
        assert!(jobs.get_opt("minimal").await.unwrap().is_none());
        assert!(k.ok(&["get", "ltj", "-o", "name"]).await.contains("zero-retention-eea"));
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn kube_sim_binary_serves_a_topology_that_kubectl_lists_by_region() {
    within(async {
        use tokio::io::AsyncBufReadExt;
        let topo = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/three-regions.yaml");
        let kubeconfig =
            std::env::temp_dir().join(format!("kube-sim-bin-{}.kubeconfig", std::process::id()));
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kube-sim"))
            .arg("--topology")
            .arg(&topo)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let printed = lines
            .next_line()
            .await
            .unwrap()
            .expect("kube-sim prints the kubeconfig path");
        assert_eq!(Path::new(&printed), kubeconfig);
        let k = Kubectl { kubeconfig };
        let out = k
            .ok(&["get", "nodes", "-L", "topology.kubernetes.io/region"])
            .await;
        let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "REGION"]
        );
        let regions: std::collections::BTreeSet<&str> = out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(
            regions.into_iter().collect::<Vec<_>>(),
            ["eu-central", "eu-west", "us-east"]
        );
        assert!(out.lines().skip(1).all(|l| l.contains(" Ready ")), "{out}");
        // The LoRATrainingJob CRD is installed by default.
        assert!(k.ok(&["get", "ltj"]).await.is_empty());
        child.kill().await.unwrap();
    })
    .await;
}

/// Sends one HTTP/1.1 request over a fresh connection; returns the status code and the body.
async fn raw_request(
    addr: std::net::SocketAddr,
    head: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{head} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    conn.write_all(&req).await.unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// kubectl's imperative `create` commands send the object as Kubernetes protobuf
/// (`application/vnd.kubernetes.protobuf`), not JSON.
#[tokio::test]
async fn kubectl_creates_namespaces_secrets_and_config_maps_imperatively() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let k = Kubectl::new(&sim, "imperative");
        let get = |args: &'static [&'static str]| {
            let k = &k;
            async move {
                let out = k.ok(args).await;
                serde_json::from_str::<serde_json::Value>(&out).unwrap()
            }
        };

        let out = k.ok(&["create", "namespace", "team-a"]).await;
        assert!(out.contains("namespace/team-a created"), "{out}");
        let out = k
            .ok(&[
                "create",
                "secret",
                "generic",
                "db",
                "-n",
                "team-a",
                "--from-literal=password=s3=cr et",
            ])
            .await;
        assert!(out.contains("secret/db created"), "{out}");
        let out = k
            .ok(&[
                "create",
                "configmap",
                "settings",
                "-n",
                "team-a",
                "--from-literal=mode=fast",
                "--from-literal=level=3",
            ])
            .await;
        assert!(out.contains("configmap/settings created"), "{out}");

        let ns = get(&["get", "namespace", "team-a", "-o", "json"]).await;
        assert_eq!(ns["metadata"]["name"], "team-a");
        assert_eq!(ns["status"]["phase"], "Active");
        // Fields the client left empty stay absent, as if it had sent JSON.
        assert!(ns["metadata"].get("generateName").is_none(), "{ns}");

        let secret = get(&["get", "secret", "db", "-n", "team-a", "-o", "json"]).await;
        assert_eq!(secret["metadata"]["name"], "db");
        assert_eq!(secret["metadata"]["namespace"], "team-a");
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret).unwrap();
        let data = secret.data.unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["password"]);
        assert_eq!(data["password"].0, b"s3=cr et");

        let cm = get(&["get", "configmap", "settings", "-n", "team-a", "-o", "json"]).await;
        assert_eq!(cm["metadata"]["name"], "settings");
        assert_eq!(
            cm["data"],
            serde_json::json!({"mode": "fast", "level": "3"})
        );
        let listed = k
            .ok(&["get", "secrets,configmaps", "-n", "team-a", "-o", "name"])
            .await;
        assert!(
            listed.contains("secret/db") && listed.contains("configmap/settings"),
            "{listed}"
        );

        // A built-in kind kube-sim does not decode from protobuf is refused by name.
        let svc = k
            .run(&[
                "create",
                "service",
                "clusterip",
                "web",
                "-n",
                "team-a",
                "--tcp=80:8080",
            ])
            .await;
        assert!(!svc.ok);
        assert!(svc.stderr.contains("\"Service\""), "{}", svc.stderr);

        // A broken protobuf body: 400 with a Status, and the server keeps serving.
        let (code, body) = raw_request(
            sim.apiserver().addr(),
            "POST /api/v1/namespaces/team-a/configmaps",
            "application/vnd.kubernetes.protobuf",
            b"k8s\0\x0a\xff\xff\xff\xff\x0f garbage",
        )
        .await;
        assert_eq!(code, 400, "{body}");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["code"], 400);
        assert!(
            status["message"].as_str().unwrap().contains("protobuf"),
            "{status}"
        );
        let (code, body) = raw_request(
            sim.apiserver().addr(),
            "POST /api/v1/namespaces",
            "application/vnd.kubernetes.protobuf",
            b"not even the magic",
        )
        .await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["kind"],
            "Status"
        );
        assert!(
            k.ok(&["get", "namespace", "team-a", "-o", "name"])
                .await
                .contains("team-a")
        );
        sim.shutdown().await;
    })
    .await;
}
