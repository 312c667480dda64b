//! Posts alerts (mode transitions and health check changes, from [`crate::ops::alerts`]) to an
//! operator's URL, in order, as JSON or as Slack's `{"text": ...}`, with a timeout and retries
//! with backoff. It runs on its own task behind a bounded queue, so a slow or dead webhook never
//! blocks serving, the mode machine or the alerts; when the queue is full, alerts are dropped
//! with a log line.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{Live, WebhookFormat};
use crate::ops::alerts::Alert;
use crate::upstream::spread::Backoff;

/// Alerts waiting to be posted at most.
pub const WEBHOOK_QUEUE: usize = 64;
/// Timeout of one POST.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per alert before it is given up.
pub const WEBHOOK_ATTEMPTS: u32 = 5;

/// The posting task.
pub struct WebhookTask {
    /// Where and how to post: the configured URL and format, read at each alert since SIGHUP
    /// may change them (no URL: the alert is not posted).
    live: Live,
    /// What to post.
    queue: mpsc::Receiver<Alert>,
    /// HTTP client (plain HTTP).
    client: reqwest::Client,
    /// Backoff between attempts.
    backoff_min: Duration,
}

impl WebhookTask {
    /// A task posting to the webhook `live` names, and the sender that feeds it.
    pub fn new(live: Live, backoff_min: Duration) -> (Self, mpsc::Sender<Alert>) {
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

    /// Posts every alert in order until the sender is gone.
    pub async fn run(mut self) {
        while let Some(alert) = self.queue.recv().await {
            let Some((url, format)) = self
                .live
                .get(|c| Some((c.mode.webhook.clone()?, c.mode.webhook_format)))
            else {
                continue;
            };
            let body = body(&alert, format);
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
                        tracing::warn!(status = %r.status(), attempt, "webhook refused an alert")
                    }
                    Err(e) => tracing::warn!(error = %e, attempt, "webhook unreachable"),
                }
                if attempt == WEBHOOK_ATTEMPTS {
                    tracing::error!(
                        check = %alert.check,
                        to = %alert.to,
                        "giving up posting an alert to the webhook"
                    );
                } else {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// The body of `alert` in `format`.
pub fn body(alert: &Alert, format: WebhookFormat) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Json => serde_json::to_value(alert).expect("alerts serialise"),
        WebhookFormat::Slack => serde_json::json!({ "text": alert.text() }),
    };
    serde_json::to_vec(&value).expect("JSON serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::machine::Transition;
    use crate::mode::Mode;
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

    fn transition(i: u64) -> Alert {
        let t = Transition {
            from: Mode::Full,
            to: Mode::ReadOnly,
            reason: format!("t{i}"),
            at_unix_ms: i,
        };
        Alert::mode(&t, "pod-1")
    }

    #[test]
    fn json_keeps_the_transition_fields_and_slack_gets_one_line() {
        let json: serde_json::Value =
            serde_json::from_slice(&body(&transition(7), WebhookFormat::Json)).unwrap();
        assert_eq!(json["from"], "full");
        assert_eq!(json["to"], "read-only");
        assert_eq!(json["reason"], "t7");
        assert_eq!(json["at_unix_ms"], 7);
        assert_eq!(json["kind"], "mode");
        assert_eq!(json["sidecar"], "pod-1");
        let slack: serde_json::Value =
            serde_json::from_slice(&body(&transition(7), WebhookFormat::Slack)).unwrap();
        assert_eq!(
            slack,
            serde_json::json!({"text": "config-sidecar pod-1: mode full → read-only: t7"})
        );
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
