//! `loraplane-demo`: plays a customer's journey on the local stack (kube-sim with three
//! regions, SeaweedFS, the operator, the API, the real trainer on the CPU) and prints a
//! timeline: the paid order, the upload, placement in the EEA, progress, a spot preemption
//! and the resume in the other EEA region, the checked download, and retention deleting
//! everything but the audit record. Exits non-zero if any step fails; stops everything it
//! started unless `--keep-running`, which keeps the stack up for `kubectl` and `curl` until
//! Ctrl-C. `tests/tools/demo.sh` (`make demo`) builds and runs it.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loraplane_e2e::config::{self, ORDERS_NS, RetentionKnobs, STOREFRONT_TOKEN};
use loraplane_e2e::journey::{self, OrderSpec, Timeline};
use loraplane_e2e::stack::{Stack, StackOptions};
use loraplane_runtime::logging::{self, LogFormat};

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Keep the stack running after the journey (prints the kubeconfig path and the API URL)
    /// until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Training steps of the demo order.
    #[arg(long, default_value_t = 40)]
    steps: u32,
    /// Seconds the demo plan keeps the LoRA after training (the download happens first).
    #[arg(long, default_value_t = 15)]
    keep_outputs_seconds: i64,
    /// Log output format of the components (their logs go to stderr; `RUST_LOG` filters).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn rule(title: &str) {
    println!(
        "\n── {title} {}",
        "─".repeat(70usize.saturating_sub(title.len()))
    );
}

async fn run(args: &Args) -> Result<(), String> {
    rule("starting the stack");
    let opts = StackOptions {
        retention: RetentionKnobs {
            keep_inputs_seconds: 5,
            keep_outputs_seconds: args.keep_outputs_seconds,
            zero_keep_outputs_seconds: 10,
        },
        ..StackOptions::default()
    };
    let stack = Stack::start(opts).await.map_err(|e| e.to_string())?;
    let api = stack.api_url().map_err(|e| e.to_string())?;
    println!(
        "kube-sim     {}  (3 regions: eu-west, eu-central [EEA], us-east [US]; spot and on-demand pools)",
        stack.sim.url()
    );
    println!(
        "SeaweedFS    {}  (buckets datasets-/checkpoints-/outputs-<region>)",
        stack.s3.endpoint()
    );
    println!(
        "operator     in-process, leader {}",
        stack.operator_identity().unwrap_or("-")
    );
    println!("API          {api}");
    println!(
        "trainer      {} (run by the simulated kubelets)",
        stack.trainer_binary.display()
    );
    println!("kubeconfig   {}", stack.kubeconfig().display());
    match tokio::process::Command::new("kubectl")
        .args([
            "--kubeconfig",
            &stack.kubeconfig().display().to_string(),
            "get",
            "nodes",
            "-L",
            "topology.kubernetes.io/region,loraplane.io/node-pool",
        ])
        .output()
        .await
    {
        Ok(o) if o.status.success() => {
            println!("$ kubectl get nodes -L topology.kubernetes.io/region,loraplane.io/node-pool");
            print!("{}", String::from_utf8_lossy(&o.stdout));
        }
        Ok(o) => {
            return Err(format!(
                "kubectl get nodes failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Err(e) => {
            return Err(format!(
                "cannot run kubectl ({e}): install it (Debian: apt-get install kubernetes-client)"
            ));
        }
    }

    rule("the customer's journey");
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("demo", "standard", "sdxl", "eea", args.steps);
    let result = journey::happy_journey(&stack, &order, &mut tl).await;
    let outcome = match result {
        Ok(report) => {
            // The contact sheet the customer saw, saved for a look (`xdg-open`, any image viewer).
            let sheet = std::env::temp_dir().join("loraplane-demo-contact-sheet.png");
            match std::fs::write(&sheet, &report.samples.contact_sheet) {
                Ok(()) => println!(
                    "\nsample contact sheet (rows: base model, then each sampled step; columns: prompts): {}",
                    sheet.display()
                ),
                Err(e) => println!(
                    "\ncould not save the contact sheet to {}: {e}",
                    sheet.display()
                ),
            }
            rule("what an auditor sees afterwards");
            let left = &report.after_retention;
            let gone = |exists: bool| if exists { "LEFT" } else { "gone" };
            println!("job object          {}", gone(left.job_exists));
            println!("trainer Secret      {}", gone(left.secret_exists));
            println!("pods                {}", left.pods.len());
            println!(
                "attempts            {}",
                report
                    .attempts
                    .iter()
                    .map(|a| format!(
                        "{} ({}, {}{})",
                        a.region,
                        a.pool,
                        a.reason.clone().unwrap_or_else(|| "completed".into()),
                        a.resumed_from_step
                            .map(|s| format!(", resumed from step {s}"))
                            .unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(" → ")
            );
            println!("claims              {}", left.claims.len());
            println!(
                "S3 objects          {} (were {} right after training)",
                left.objects.len(),
                report.objects_after_success.len()
            );
            println!(
                "artifact links      HTTP {}",
                report.artifacts_status_after_retention
            );
            println!(
                "sample links        HTTP {}",
                report.samples_status_after_retention
            );
            let field = |k: &str| {
                report
                    .audit_record
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            println!(
                "audit record        reason {}, tenant {}, regions {}, {} objects / {} bytes deleted at {}, kept until {}",
                field("reason"),
                field("tenant"),
                field("regions"),
                field("objectsDeleted"),
                field("bytesDeleted"),
                field("deletedAt"),
                field("keepUntil")
            );
            println!(
                "                    (kubectl -n loraplane-system get configmaps -l loraplane.io/record=job-audit)"
            );
            let residency_ok = report
                .attempts
                .iter()
                .all(|a| journey::jurisdiction(&a.region) == "eea");
            let resumed = report
                .attempts
                .last()
                .and_then(|a| a.resumed_from_step)
                .unwrap_or(0);
            if !left.objects.is_empty()
                || !left.claims.is_empty()
                || left.job_exists
                || left.secret_exists
                || !left.pods.is_empty()
            {
                Err(format!(
                    "retention left data behind: {:?} {:?}",
                    left.claims, left.objects
                ))
            } else if !residency_ok || report.attempts.len() < 2 || resumed == 0 {
                Err(format!(
                    "the failover did not go as promised: {:?}",
                    report.attempts
                ))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e.to_string()),
    };
    match journey::kubectl_get_ltj(&stack, false).await {
        Ok(out) => {
            println!("\n$ kubectl get ltj -n {ORDERS_NS}");
            print!("{out}");
        }
        Err(e) => println!("kubectl get ltj failed: {e}"),
    }
    if args.keep_running {
        rule("the stack keeps running (Ctrl-C stops it)");
        println!("export KUBECONFIG={}", stack.kubeconfig().display());
        println!("kubectl get ltj -A; kubectl describe ltj -n {ORDERS_NS}");
        println!("API: {api}   (tenant token: {STOREFRONT_TOKEN})");
        println!("  curl -H 'Authorization: Bearer {STOREFRONT_TOKEN}' {api}/v1/jobs");
        println!(
            "S3: {} (access key {}, plans: {})",
            stack.s3.endpoint(),
            stack.s3.access_key(),
            config::api_config(&RetentionKnobs::default(), None)
                .map(|c| c.plans.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    rule("stopping");
    tokio::time::timeout(Duration::from_secs(30), stack.shutdown())
        .await
        .map_err(|_| "the stack did not stop within 30 s".to_string())?;
    println!("everything stopped");
    outcome
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = logging::init(args.log_format) {
        eprintln!("loraplane-demo: {e}");
        return ExitCode::FAILURE;
    }
    match run(&args).await {
        Ok(()) => {
            println!("\ndemo: every step passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\ndemo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
