//! Watches: a streamed response of JSON watch events, starting with the current objects (no
//! or `0` resourceVersion, or `sendInitialEvents=true`) or with the stored history after a
//! resourceVersion, then live changes. Bookmarks on request; `410 Gone` (as an `ERROR` event,
//! like kube-apiserver) when the resourceVersion is older than the history.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::meta::ApiError;
use super::ops::ApiState;
use super::resources::ResourceType;
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{Event, EventType, namespace_of, resource_key};
use super::table;

/// What a watch request asked for.
#[derive(Debug)]
pub(crate) struct WatchParams {
    pub(crate) rt: ResourceType,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
    pub(crate) resource_version: Option<String>,
    pub(crate) bookmarks: bool,
    pub(crate) send_initial_events: Option<bool>,
    pub(crate) timeout: Option<u64>,
    pub(crate) table: bool,
}

impl WatchParams {
    fn matches(&self, obj: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| namespace_of(obj) == ns)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    /// What a stored event looks like to this watcher (an update that moves an object into
    /// or out of the selection becomes ADDED or DELETED), or nothing.
    fn translate(&self, e: &Event) -> Option<&'static str> {
        let now = self.matches(&e.object);
        match e.kind {
            EventType::Added => now.then_some("ADDED"),
            EventType::Deleted => now.then_some("DELETED"),
            EventType::Modified => {
                let before = e.old.as_deref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }

    fn line(&self, kind: &str, e: &Event) -> Bytes {
        if self.table {
            let t = table::table(&self.rt, &[&*e.object], e.rv, None);
            return Bytes::from(format!("{}\n", json!({"type": kind, "object": t})));
        }
        Bytes::from(format!(
            "{{\"type\":\"{kind}\",\"object\":{}}}\n",
            e.encoded_object()
        ))
    }

    fn object_line(&self, kind: &str, obj: &Value) -> Bytes {
        let obj = if self.table {
            table::table(&self.rt, &[obj], 0, None)
        } else {
            obj.clone()
        };
        Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": metadata});
        Bytes::from(format!("{}\n", json!({"type": "BOOKMARK", "object": obj})))
    }
}

type Tx = mpsc::Sender<Bytes>;

/// Starts a watch and returns the streaming response; watchers that asked for bookmarks get
/// one every `bookmark_every`.
pub(crate) fn serve(
    state: &ApiState,
    bookmark_every: Duration,
    params: WatchParams,
) -> Result<Response, ApiError> {
    let key = resource_key(&params.rt.group, &params.rt.plural);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut restarts = state.restarts.subscribe();
    // Snapshot and subscription under one lock: nothing falls between them.
    let (backlog, live, start_rv, gone) = {
        let store = state.lock();
        let live = store.subscribe();
        let start_rv = store.rv();
        let rv: Option<u64> = match params.resource_version.as_deref() {
            None | Some("0") => None,
            Some(r) => Some(
                r.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {r:?}")))?,
            ),
        };
        let initial = params.send_initial_events == Some(true) || rv.is_none();
        let mut backlog = Vec::new();
        let mut gone = None;
        if initial {
            for obj in store.list(&key, params.namespace.as_deref()) {
                if params.matches(obj) {
                    backlog.push(params.object_line("ADDED", obj));
                }
            }
            if params.send_initial_events == Some(true) {
                backlog.push(params.bookmark(start_rv, true));
            }
        } else if let Some(rv) = rv {
            match store.events_since(&key, rv) {
                Some(events) => {
                    for e in events {
                        if let Some(kind) = params.translate(&e) {
                            backlog.push(params.line(kind, &e));
                        }
                    }
                }
                None => gone = Some(rv),
            }
        }
        (backlog, live, start_rv, gone)
    };
    restarts.borrow_and_update();
    tokio::spawn(async move {
        if let Some(rv) = gone {
            let status = ApiError::gone(rv).status();
            let _ = tx
                .send(Bytes::from(format!(
                    "{}\n",
                    json!({"type": "ERROR", "object": status})
                )))
                .await;
            return;
        }
        for line in backlog {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        stream_live(
            tx,
            live,
            &mut restarts,
            params,
            key,
            start_rv,
            bookmark_every,
        )
        .await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

async fn stream_live(
    tx: Tx,
    mut live: tokio::sync::broadcast::Receiver<Arc<Event>>,
    restarts: &mut tokio::sync::watch::Receiver<u64>,
    params: WatchParams,
    key: String,
    start_rv: u64,
    bookmark_every: Duration,
) {
    let deadline = tokio::time::sleep(Duration::from_secs(params.timeout.unwrap_or(1800)));
    tokio::pin!(deadline);
    let mut ticker = tokio::time::interval(bookmark_every);
    ticker.tick().await;
    let mut seen = start_rv;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = restarts.changed() => break,
            _ = tx.closed() => break,
            _ = ticker.tick(), if params.bookmarks => {
                if tx.send(params.bookmark(seen, false)).await.is_err() {
                    break;
                }
            }
            got = live.recv() => match got {
                Ok(e) => {
                    if e.rv <= seen {
                        continue;
                    }
                    seen = e.rv;
                    if &*e.resource != key.as_str() {
                        continue;
                    }
                    if let Some(kind) = params.translate(&e)
                        && tx.send(params.line(kind, &e)).await.is_err()
                    {
                        break;
                    }
                }
                // A watcher too slow to keep up is closed; it resumes from its last version.
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => break,
            },
        }
    }
}
