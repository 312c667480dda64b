//! What a rendered file's `on_change` does once the new file is in place: run a command (no
//! shell, killed past its timeout, its output logged) or signal the process a pid file names.
//! Either way the outcome is a sentence for the file's status: the render check shows failures.

use std::path::Path;
use std::process::Stdio;

use rustix::process::{kill_process, Pid, Signal};

use crate::config::OnChange;

/// Most bytes of a command's output logged or quoted in an error.
const OUTPUT_SHOWN: usize = 2048;

/// Runs `action` for the file at `path`; `Err` says why it failed.
pub async fn run(action: &OnChange, path: &Path) -> Result<(), String> {
    match action {
        OnChange::Command { argv, timeout } => {
            let child = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Past the timeout the future is dropped, and the command with it.
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("on_change: cannot run {:?}: {e}", argv[0]))?;
            let output = tokio::time::timeout(*timeout, child.wait_with_output())
                .await
                .map_err(|_| {
                    format!(
                        "on_change: {:?} ran past {timeout:?} and was killed",
                        argv[0]
                    )
                })?
                .map_err(|e| format!("on_change: waiting for {:?}: {e}", argv[0]))?;
            let stdout = shown(&output.stdout);
            let stderr = shown(&output.stderr);
            if output.status.success() {
                tracing::info!(path = %path.display(), command = ?argv, stdout, stderr, "on_change ran");
                Ok(())
            } else {
                tracing::warn!(path = %path.display(), command = ?argv, status = %output.status, stdout, stderr, "on_change failed");
                Err(format!(
                    "on_change: {:?} {}: {stderr}",
                    argv[0], output.status
                ))
            }
        }
        OnChange::Signal { signal, pid_file } => {
            let text = std::fs::read_to_string(pid_file)
                .map_err(|e| format!("on_change: cannot read {}: {e}", pid_file.display()))?;
            let pid = text
                .trim()
                .parse::<i32>()
                .ok()
                .and_then(Pid::from_raw)
                .ok_or_else(|| {
                    format!(
                        "on_change: {} holds no pid: {:?}",
                        pid_file.display(),
                        text.trim()
                    )
                })?;
            kill_process(pid, signal_named(signal))
                .map_err(|e| format!("on_change: SIG{signal} to {}: {e}", pid.as_raw_nonzero()))?;
            tracing::info!(path = %path.display(), signal, pid = pid.as_raw_nonzero(), "on_change signalled");
            Ok(())
        }
    }
}

/// The signal a checked name stands for ([`crate::config::render::SIGNALS`]).
fn signal_named(name: &str) -> Signal {
    match name {
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "INT" => Signal::INT,
        "TERM" => Signal::TERM,
        "WINCH" => Signal::WINCH,
        _ => Signal::HUP,
    }
}

/// A command's output as text, trimmed, its end kept if it is long.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().rev().nth(OUTPUT_SHOWN) {
        Some((cut, _)) => format!("...{}", &text[cut..]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn command(argv: &[&str], timeout: Duration) -> OnChange {
        OnChange::Command {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            timeout,
        }
    }

    #[tokio::test]
    async fn commands_succeed_fail_and_time_out() {
        let path = Path::new("/tmp/x.json");
        let long = Duration::from_secs(10);
        assert_eq!(run(&command(&["true"], long), path).await, Ok(()));
        let e = run(
            &command(&["sh", "-c", "echo broken >&2; exit 3"], long),
            path,
        )
        .await
        .unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
        let e = run(&command(&["/no/such/program"], long), path)
            .await
            .unwrap_err();
        assert!(e.contains("cannot run"), "{e}");
        let e = run(&command(&["sleep", "30"], Duration::from_millis(200)), path)
            .await
            .unwrap_err();
        assert!(e.contains("was killed"), "{e}");
    }

    #[tokio::test]
    async fn signals_go_to_the_pid_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("app.pid");
        let signal = OnChange::Signal {
            signal: "HUP".into(),
            pid_file: pid_file.clone(),
        };
        let path = Path::new("/tmp/x.json");
        assert!(run(&signal, path)
            .await
            .unwrap_err()
            .contains("cannot read"));
        std::fs::write(&pid_file, "not a pid\n").unwrap();
        assert!(run(&signal, path)
            .await
            .unwrap_err()
            .contains("holds no pid"));
        // A shell that counts its SIGHUPs, the way a server reloads on one. A shell cannot trap
        // a signal ignored when it started (POSIX), as SIGHUP is under `nohup`: env resets it.
        let mut child = tokio::process::Command::new("env")
            .args([
                "--default-signal=HUP",
                "sh",
                "-c",
                "trap 'echo hup' HUP; echo ready; while :; do sleep 0.05; done",
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stdout.take().unwrap(),
        ));
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
        std::fs::write(&pid_file, format!("{}\n", child.id().unwrap())).unwrap();
        run(&signal, path).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
        assert_eq!(got.unwrap().unwrap().as_deref(), Some("hup"));
    }
}
