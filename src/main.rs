//! The `config-sidecar` binary: parse and validate all configuration, bind, serve until SIGTERM or
//! SIGINT, drain, exit 0.

use std::process::ExitCode;

use clap::Parser;
use config_sidecar::config::{Cli, Config, Environment};

fn main() -> ExitCode {
    glibc::tune_allocator();
    config_sidecar::ops::allocator::install_trim(glibc::trim_allocator);
    // clap itself exits with code 2 and a usage message on unknown or malformed flags.
    let cli = Cli::parse();
    if let Some(path) = &cli.healthcheck {
        return healthcheck(cli.settings.listen, path);
    }
    // Parsed again with the file, which fills what flags and environment did not give.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if cli.check_config {
        return check_config(args);
    }
    let config = match Config::from_args(args.clone(), Environment::Read) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let log = config_sidecar::ops::telemetry::init(config.log_format, &config.log_level);
    let open_files = raise_open_files_limit();
    // Each connection is a file; etcd clients, the snapshot and the runtime need a few more.
    if open_files.is_some_and(|n| n < config.http.max_connections as u64 + 64) {
        tracing::warn!(
            open_files,
            max_connections = config.http.max_connections,
            "the open-file limit is below max_connections: past it, connections are refused by the kernel, not answered 503"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("config-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        // Signal handlers before the port: until they are registered SIGTERM and SIGHUP end the
        // process on the spot, and a supervisor may send either as soon as the port answers.
        let shutdown = shutdown_signal();
        let (reloaded, live) = tokio::sync::watch::channel(config);
        let reload = config_sidecar::ops::reload::on_sighup(args, reloaded, log);
        let config = live.borrow().clone();
        let listener = match tokio::net::TcpListener::bind(config.http.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %config.http.listen, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            listen = %config.http.listen,
            endpoints = ?config.etcd.endpoints,
            prefixes = ?config.sync.prefixes,
            "config-sidecar starting"
        );
        tokio::spawn(reload);
        let live = config_sidecar::config::Live::new(live);
        match config_sidecar::serve_live(live, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    });
    // A snapshot write wedged on a dead disk holds a blocking thread; it must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Raises the soft limit on open files to the hard one, as Go and most servers do: the usual
/// soft default (1024) is below `max_connections`. Returns the limit now in force (`None`:
/// unlimited).
fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return limit.maximum;
        }
    }
    limit.current
}

/// `--check-config`: the whole configuration validated, then every setting printed with where it
/// came from.
fn check_config(args: Vec<std::ffi::OsString>) -> ExitCode {
    use config_sidecar::config::settings::parse;
    let checked = parse(args, Environment::Read).and_then(|parsed| {
        let described = parsed.describe();
        Config::from_settings(parsed.settings, parsed.given).map(|_| described)
    });
    match checked {
        Ok(described) => {
            print!("{described}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("config-sidecar: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--healthcheck`: only the listen address matters, so a health check command needs no other
/// setting (the prefixes may be given to the serving process only).
fn healthcheck(listen: std::net::SocketAddr, path: &str) -> ExitCode {
    match config_sidecar::ops::selfcheck::check(listen, path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("config-sidecar: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes at SIGINT or SIGTERM. Both are caught from the call on, not from the first poll.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let received = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = received(interrupt) => tracing::info!("SIGINT received"),
            () = received(terminate) => tracing::info!("SIGTERM received"),
        }
    }
}

/// The binary's only unsafe code: two calls into glibc's allocator (the library forbids unsafe
/// code; `config_sidecar::ops::allocator` says why and when they run).
mod glibc {
    /// Fixes the mmap threshold (`ops::allocator::MMAP_THRESHOLD`). Before any thread starts.
    pub fn tune_allocator() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt sets one parameter of the allocator; no other thread runs yet.
        unsafe {
            let threshold = config_sidecar::ops::allocator::MMAP_THRESHOLD as libc::c_int;
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold);
        }
    }

    /// Hands free memory in the allocator's arenas back to the system.
    pub fn trim_allocator() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim takes the arenas' locks and releases only pages no block holds.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
