#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Conformance of watches through a real `kube::Client` and kube-runtime's watcher: initial
//! state, resume from a resourceVersion, bookmarks, `410 Gone` after the history expired
//! (simulated apiserver restart), selector-filtered watches and streaming lists.

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube_sim::{KubeSim, SimConfig};
use serde_json::json;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .unwrap()
}

fn describe(e: &WatchEvent<ConfigMap>) -> String {
    match e {
        WatchEvent::Added(o) => format!("ADDED {}", o.metadata.name.as_deref().unwrap_or("")),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.metadata.name.as_deref().unwrap_or("")),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.metadata.name.as_deref().unwrap_or("")),
        WatchEvent::Bookmark(_) => "BOOKMARK".to_string(),
        WatchEvent::Error(e) => format!("ERROR {}", e.code),
    }
}

/// The next event that is not a bookmark (kube asks for bookmarks by default).
async fn next_change(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
) -> String {
    loop {
        let e = stream.try_next().await.unwrap().expect("watch ended");
        if !matches!(e, WatchEvent::Bookmark(_)) {
            return describe(&e);
        }
    }
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_and_sees_every_change() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let a = cms
            .create(&PostParams::default(), &cm("a", json!({})))
            .await
            .unwrap();
        let rv = a.metadata.resource_version.clone().unwrap();
        // Changes made while nobody watches are replayed from `rv`.
        cms.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "2"}})),
        )
        .await
        .unwrap();
        cms.create(&PostParams::default(), &cm("b", json!({})))
            .await
            .unwrap();
        let mut stream = cms
            .watch(&WatchParams::default(), &rv)
            .await
            .unwrap()
            .boxed();
        cms.delete("a", &DeleteParams::default()).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            seen.push(next_change(&mut stream).await);
        }
        assert_eq!(seen, ["MODIFIED a", "ADDED b", "DELETED a"]);

        // Without a resourceVersion ("0"), a watch starts with the current objects.
        let mut fresh = cms
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        assert_eq!(next_change(&mut fresh).await, "ADDED b");
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn expired_history_answers_410_gone() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let a = cms
            .create(&PostParams::default(), &cm("a", json!({})))
            .await
            .unwrap();
        let old_rv = a.metadata.resource_version.clone().unwrap();
        let mut open = cms
            .watch(&WatchParams::default(), &old_rv)
            .await
            .unwrap()
            .boxed();
        cms.create(&PostParams::default(), &cm("b", json!({})))
            .await
            .unwrap();
        assert_eq!(next_change(&mut open).await, "ADDED b");

        sim.faults().restart_apiserver();
        // The open watch ends, like a dropped connection.
        loop {
            match open.try_next().await {
                Ok(Some(WatchEvent::Bookmark(_))) => continue,
                Ok(None) | Err(_) => break,
                Ok(Some(other)) => panic!("unexpected {}", describe(&other)),
            }
        }
        let mut resumed = cms
            .watch(&WatchParams::default(), &old_rv)
            .await
            .unwrap()
            .boxed();
        match resumed.try_next().await.unwrap().unwrap() {
            WatchEvent::Error(e) => {
                assert_eq!(e.code, 410);
                assert_eq!(e.reason, "Expired");
            }
            other => panic!("expected 410, got {}", describe(&other)),
        }
        // Watching from the list's current version works again.
        let list = cms.list(&Default::default()).await.unwrap();
        let rv = list.metadata.resource_version.unwrap();
        let mut again = cms
            .watch(&WatchParams::default(), &rv)
            .await
            .unwrap()
            .boxed();
        cms.create(&PostParams::default(), &cm("c", json!({})))
            .await
            .unwrap();
        assert_eq!(next_change(&mut again).await, "ADDED c");
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bookmarks_carry_the_latest_resource_version() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        sim.faults()
            .set_bookmark_interval(Duration::from_millis(50));
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let a = cms
            .create(&PostParams::default(), &cm("a", json!({})))
            .await
            .unwrap();
        let rv = a.metadata.resource_version.clone().unwrap();
        let mut stream = cms
            .watch(&WatchParams::default(), &rv)
            .await
            .unwrap()
            .boxed();
        // Another resource changes; the bookmark still advances.
        let other: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(sim.client(), "default");
        let s = other
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "s"}})).unwrap(),
            )
            .await
            .unwrap();
        let want: u64 = s.metadata.resource_version.unwrap().parse().unwrap();
        loop {
            match stream.try_next().await.unwrap().unwrap() {
                WatchEvent::Bookmark(b) => {
                    let got: u64 = b.metadata.resource_version.parse().unwrap();
                    if got >= want {
                        break;
                    }
                }
                other => panic!("unexpected {}", describe(&other)),
            }
        }
        // Without allowWatchBookmarks nothing but changes arrives.
        let mut quiet = cms
            .watch(&WatchParams::default().disable_bookmarks(), &rv)
            .await
            .unwrap()
            .boxed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        cms.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "x"}})),
        )
        .await
        .unwrap();
        assert_eq!(
            describe(&quiet.try_next().await.unwrap().unwrap()),
            "MODIFIED a"
        );
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn selector_watches_see_objects_enter_and_leave() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let list = cms.list(&Default::default()).await.unwrap();
        let rv = list.metadata.resource_version.unwrap();
        let mut stream = cms
            .watch(&WatchParams::default().labels("team=a"), &rv)
            .await
            .unwrap()
            .boxed();
        cms.create(&PostParams::default(), &cm("x", json!({"team": "b"})))
            .await
            .unwrap();
        cms.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await
        .unwrap();
        cms.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "2"}})),
        )
        .await
        .unwrap();
        cms.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "c"}}})),
        )
        .await
        .unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(next_change(&mut stream).await);
        }
        assert_eq!(seen, ["ADDED x", "MODIFIED x", "DELETED x"]);
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn kube_runtime_watcher_lists_then_follows_and_streams_initial_events() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        cms.create(&PostParams::default(), &cm("before", json!({})))
            .await
            .unwrap();
        for config in [
            watcher::Config::default(),
            watcher::Config::default().streaming_lists(),
        ] {
            let mut events = watcher(cms.clone(), config).boxed();
            let mut initial = Vec::new();
            loop {
                match events.try_next().await.unwrap().unwrap() {
                    watcher::Event::Init => {}
                    watcher::Event::InitApply(o) => initial.push(o.metadata.name.unwrap()),
                    watcher::Event::InitDone => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(initial.contains(&"before".to_string()), "{initial:?}");
            let name = format!("after-{}", initial.len());
            cms.create(&PostParams::default(), &cm(&name, json!({})))
                .await
                .unwrap();
            loop {
                if let watcher::Event::Apply(o) = events.try_next().await.unwrap().unwrap()
                    && o.metadata.name.as_deref() == Some(name.as_str())
                {
                    break;
                }
            }
        }
        sim.shutdown().await;
    })
    .await;
}
