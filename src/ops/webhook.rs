//! Posts mode transitions as JSON to an operator's URL, in order, with a timeout and retries with
//! backoff. It runs on its own task behind a bounded queue, so a slow or dead webhook never blocks
//! serving or the mode machine; when the queue is full, transitions are dropped with a log line.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Live;
use crate::mirror::mode::Transition;
use crate::mirror::sync::Backoff;

/// Transitions waiting to be posted at most.
pub const WEBHOOK_QUEUE: usize = 64;
/// Timeout of one POST.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per transition before it is given up.
pub const WEBHOOK_ATTEMPTS: u32 = 5;

/// The posting task.
pub struct WebhookTask {
    /// Where to post: the configured URL, read at each transition since SIGHUP may change it
    /// (no URL: the transition is not posted).
    live: Live,
    /// What to post.
    queue: mpsc::Receiver<Transition>,
    /// HTTP client (plain HTTP).
    client: reqwest::Client,
    /// Backoff between attempts.
    backoff_min: Duration,
}

impl WebhookTask {
    /// A task posting to the webhook `live` names, and the sender that feeds it.
    pub fn new(live: Live, backoff_min: Duration) -> (Self, mpsc::Sender<Transition>) {
        let (tx, queue) = mpsc::channel(WEBHOOK_QUEUE);
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .expect("a plain HTTP client builds");
        (
            WebhookTask {
                live,
                queue,
                client,
                backoff_min,
            },
            tx,
        )
    }

    /// Posts every transition in order until the sender is gone.
    pub async fn run(mut self) {
        while let Some(transition) = self.queue.recv().await {
            let Some(url) = self.live.get(|c| c.mode.webhook.clone()) else {
                continue;
            };
            let body = serde_json::to_vec(&transition).expect("transitions serialise");
            let mut backoff = Backoff::new(self.backoff_min, self.backoff_min * 16);
            for attempt in 1..=WEBHOOK_ATTEMPTS {
                let result = self
                    .client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match result {
                    Ok(r) if r.status().is_success() => break,
                    Ok(r) => {
                        tracing::warn!(status = %r.status(), attempt, "webhook refused a transition")
                    }
                    Err(e) => tracing::warn!(error = %e, attempt, "webhook unreachable"),
                }
                if attempt == WEBHOOK_ATTEMPTS {
                    tracing::error!(
                        to = transition.to.as_str(),
                        "giving up posting a transition to the webhook"
                    );
                } else {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::mode::Mode;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// A fixed configuration posting to `url`.
    fn posting_to(url: String) -> Live {
        let mut config =
            crate::config::Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/a/"]).unwrap();
        config.mode.webhook = Some(url);
        Live::fixed(config)
    }

    fn transition(i: u64) -> Transition {
        Transition {
            from: Mode::Full,
            to: Mode::ReadOnly,
            reason: format!("t{i}"),
            at_unix_ms: i,
        }
    }

    #[tokio::test]
    async fn retries_a_failing_webhook_and_keeps_order() {
        let calls = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (c, g) = (calls.clone(), got.clone());
        let app = Router::new().route(
            "/",
            post(move |Json(t): Json<serde_json::Value>| {
                let (c, g) = (c.clone(), g.clone());
                async move {
                    // The first two attempts fail: the sender must retry, not skip.
                    if c.fetch_add(1, Ordering::SeqCst) < 2 {
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    g.lock()
                        .unwrap()
                        .push(t["reason"].as_str().unwrap().to_string());
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let (task, tx) = WebhookTask::new(posting_to(url), Duration::from_millis(5));
        let running = tokio::spawn(task.run());
        for i in 0..3 {
            tx.try_send(transition(i)).unwrap();
        }
        drop(tx);
        running.await.unwrap();
        assert_eq!(*got.lock().unwrap(), ["t0", "t1", "t2"]);
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_dead_webhook_never_blocks_the_sender() {
        // Nothing listens here; the queue still accepts without waiting until it is full.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let live = posting_to(format!("http://127.0.0.1:{port}/"));
        let (task, tx) = WebhookTask::new(live, Duration::from_secs(60));
        let running = tokio::spawn(task.run());
        let accepted = (0..WEBHOOK_QUEUE as u64 * 2)
            .filter(|i| tx.try_send(transition(*i)).is_ok())
            .count();
        assert!(accepted >= WEBHOOK_QUEUE, "accepted {accepted}");
        assert!(
            accepted <= WEBHOOK_QUEUE + 1,
            "bounded: accepted {accepted}"
        );
        running.abort();
    }
}
