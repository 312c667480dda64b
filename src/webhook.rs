//! Posts mode transitions as JSON to an operator's URL, in order, with a timeout and retries with
//! backoff. It runs on its own task behind a bounded queue, so a slow or dead webhook never blocks
//! serving or the mode machine; when the queue is full, transitions are dropped with a log line.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::mode::Transition;
use crate::sync::Backoff;

/// Transitions waiting to be posted at most.
pub const WEBHOOK_QUEUE: usize = 64;
/// Timeout of one POST.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per transition before it is given up.
pub const WEBHOOK_ATTEMPTS: u32 = 5;

/// The posting task.
pub struct WebhookTask {
    /// Where to post.
    url: String,
    /// What to post.
    queue: mpsc::Receiver<Transition>,
    /// HTTP client (plain HTTP).
    client: reqwest::Client,
    /// Backoff between attempts.
    backoff_min: Duration,
}

impl WebhookTask {
    /// A task posting to `url`, and the sender that feeds it.
    pub fn new(url: String, backoff_min: Duration) -> (Self, mpsc::Sender<Transition>) {
        let (tx, queue) = mpsc::channel(WEBHOOK_QUEUE);
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .expect("a plain HTTP client builds");
        (
            WebhookTask {
                url,
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
            let body = serde_json::to_vec(&transition).expect("transitions serialise");
            let mut backoff = Backoff::new(self.backoff_min, self.backoff_min * 16);
            for attempt in 1..=WEBHOOK_ATTEMPTS {
                let result = self
                    .client
                    .post(&self.url)
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
