//! From [`Settings`] to a validated [`Config`]: what one setting's parser cannot check alone
//! (URLs, lists, settings that go together, files to read) is checked here, each failure naming
//! the setting.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::defaults::read_defaults;
use crate::config::render::read_targets;
use crate::config::secret::{read_pem, read_secret};
use crate::config::settings::{self, Environment, Given, Settings};
use crate::config::{
    directory_of, Config, ConfigError, EtcdAuth, EtcdConfig, EtcdTls, HttpConfig, ModeConfig,
    Prefixes, Secret, SnapshotConfig, SyncConfig, WriteConfig,
};

impl Config {
    /// The configuration from flags in `args` (the first is the program name), then, when `env`
    /// says so, `CONFIG_SIDECAR_*` environment variables, then the file `--config` names, then
    /// defaults. The process reads its environment; tests and embedders may not.
    pub fn from_args<I, T>(args: I, env: Environment) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let parsed = settings::parse(args, env)?;
        Config::from_settings(parsed.settings, parsed.given)
    }

    /// A configuration for `endpoints` and `prefixes` with every other setting at its default;
    /// what tests and embedders start from.
    pub fn for_endpoints(endpoints: &[String], prefixes: &[&str]) -> Result<Config, ConfigError> {
        let mut args = vec![
            "config-sidecar".to_string(),
            format!("--endpoints={}", endpoints.join(",")),
        ];
        args.extend(prefixes.iter().map(|p| format!("--prefix={p}")));
        Config::from_args(args, Environment::Ignored)
    }

    /// The configuration `given` describes: what a reload applies.
    pub fn from_given(given: &Given) -> Result<Config, ConfigError> {
        Config::from_settings(settings::from_given(given)?, given.clone())
    }

    /// Validates `settings` (whose text is `given`) and builds the configuration from them.
    pub fn from_settings(s: Settings, given: Given) -> Result<Config, ConfigError> {
        let endpoints = trimmed(s.endpoints);
        if endpoints.is_empty() {
            return Err(ConfigError::new("--endpoints", "no etcd endpoint given"));
        }
        for e in &endpoints {
            validate_endpoint(e)?;
        }
        let prefixes = trimmed(s.prefixes);
        if prefixes.is_empty() {
            return Err(ConfigError::new(
                "--prefix",
                "no prefix to mirror: give --prefix /your/app/ (or CONFIG_SIDECAR_PREFIXES)",
            ));
        }
        for p in &prefixes {
            if !p.starts_with('/') {
                return Err(ConfigError::new(
                    "--prefix",
                    format!("{p:?} must start with '/'"),
                ));
            }
            if p.contains('\0') {
                return Err(ConfigError::new(
                    "--prefix",
                    format!("{p:?} contains a NUL byte"),
                ));
            }
        }
        for (flag, addr) in [
            ("--listen", Some(s.listen)),
            ("--consul-listen", s.consul_listen),
            ("--grpc-listen", s.grpc_listen),
        ] {
            if addr.is_some_and(|a| !a.ip().is_loopback()) && !s.allow_remote {
                return Err(ConfigError::new(
                    flag,
                    format!(
                        "{} is reachable from other hosts; the sidecar serves the app beside it \
                         on loopback. Give --allow-remote to listen there anyway",
                        addr.expect("checked above")
                    ),
                ));
            }
        }
        if s.consul_listen
            .is_some_and(|c| c == s.listen && c.port() != 0)
        {
            return Err(ConfigError::new(
                "--consul-listen",
                "must differ from --listen: Consul's /v1/kv/ is not the sidecar's",
            ));
        }
        let allowed_hosts: Vec<String> = trimmed(s.allowed_hosts)
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for host in &allowed_hosts {
            let plain_name = host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
            });
            if !plain_name || host.contains("://") {
                return Err(ConfigError::new(
                    "--allowed-hosts",
                    format!("{host:?} is not a host name or address (no scheme, no path)"),
                ));
            }
        }
        if let Err(e) = super::log_filter(&s.log_level) {
            return Err(ConfigError::new("--log-level", e));
        }
        if s.endpoint_cooldown_max < s.endpoint_cooldown {
            return Err(ConfigError::new(
                "--endpoint-cooldown-max",
                "must not be below --endpoint-cooldown",
            ));
        }
        if s.backoff_max < s.backoff_min {
            return Err(ConfigError::new(
                "--backoff-max",
                "must not be below --backoff-min",
            ));
        }
        if let Some(url) = &s.webhook {
            let ok = url
                .parse::<http::Uri>()
                .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
            if !ok {
                return Err(ConfigError::new(
                    "--webhook",
                    format!("{url:?} is not an http:// URL"),
                ));
            }
        }
        let defaults = match &s.defaults {
            Some(path) => Some(read_defaults(path, &Prefixes::new(prefixes.clone()))?),
            None => None,
        };
        let render = read_targets(&s.render, &Prefixes::new(prefixes.clone()))?;
        let admin_token = s
            .admin_token_file
            .map(|path| read_secret("--admin-token-file", &path))
            .transpose()?;
        let token = s
            .write_token_file
            .map(|path| read_secret("--write-token-file", &path))
            .transpose()?;
        let tls = etcd_tls(
            &endpoints,
            s.etcd_ca_file,
            s.etcd_cert_file,
            s.etcd_key_file,
        )?;
        let auth = etcd_auth(s.etcd_username, s.etcd_password, s.etcd_password_file)?;
        let snapshot = match s.snapshot {
            None => None,
            Some(path) => {
                let dir = directory_of(&path);
                if !dir.is_dir() {
                    return Err(ConfigError::new(
                        "--snapshot",
                        format!("directory {} does not exist", dir.display()),
                    ));
                }
                if path.is_dir() {
                    return Err(ConfigError::new(
                        "--snapshot",
                        format!("{} is a directory", path.display()),
                    ));
                }
                Some(SnapshotConfig {
                    path,
                    ready_requires_etcd: s.ready_requires_etcd,
                    write_timeout: s.snapshot_write_timeout,
                })
            }
        };
        Ok(Config {
            mode: ModeConfig {
                probe_interval: s.probe_interval,
                probe_interval_max: s.probe_interval_max,
                probe_timeout: s.probe_timeout,
                probe_idle_interval: s.probe_idle_interval,
                degrade_after: s.degrade_after,
                recover_after: s.recover_after,
                webhook: s.webhook,
                webhook_format: s.webhook_format,
                alert_min_interval: s.alert_min_interval,
                pin: s.pin,
                admin_token,
            },
            writes: WriteConfig {
                allowed: s.allow_writes,
                token,
            },
            snapshot,
            defaults,
            render,
            etcd: EtcdConfig {
                endpoints,
                dial_timeout: s.dial_timeout,
                request_timeout: s.request_timeout,
                keepalive_interval: s.keepalive_interval,
                keepalive_timeout: s.keepalive_timeout,
                tls,
                auth,
                selection: s.endpoint_selection,
                cooldown: s.endpoint_cooldown,
                cooldown_max: s.endpoint_cooldown_max,
                grpc_proxy: s.etcd_grpc_proxy,
            },
            sync: SyncConfig {
                prefixes: Prefixes::new(prefixes),
                watch_deadline: s.watch_deadline,
                backoff_min: s.backoff_min,
                backoff_max: s.backoff_max,
                first_load_jitter: s.first_load_jitter,
                catch_up_jitter: s.catch_up_jitter,
                page_size: s.page_size,
                history_bytes: s.history_bytes,
            },
            http: HttpConfig {
                listen: s.listen,
                consul_listen: s.consul_listen,
                grpc_listen: s.grpc_listen,
                shutdown_grace: s.shutdown_grace,
                cache_bytes: s.cache_bytes,
                header_read_timeout: s.header_read_timeout,
                idle_timeout: s.idle_timeout,
                body_read_timeout: s.body_read_timeout,
                send_timeout: s.send_timeout,
                allow_remote: s.allow_remote,
                allowed_hosts,
                max_connections: s.max_connections as usize,
                max_streams: s.max_streams as usize,
                max_blocking_queries: s.max_blocking_queries as usize,
            },
            log_format: s.log_format,
            log_level: s.log_level,
            memory_budget: s.memory_budget,
            worker_threads: s.worker_threads as usize,
            given,
        })
    }
}

/// A list setting's values, each trimmed, empty ones dropped.
fn trimmed(values: Vec<String>) -> Vec<String> {
    values
        .iter()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Username and password: both or neither; the password from the flag or environment, or from
/// a file, not both.
fn etcd_auth(
    username: Option<String>,
    password: Option<Secret>,
    password_file: Option<PathBuf>,
) -> Result<Option<EtcdAuth>, ConfigError> {
    let password = match (password, password_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "--etcd-password",
                "give the password or a password file, not both",
            ))
        }
        (Some(p), None) if p.expose().is_empty() => {
            return Err(ConfigError::new("--etcd-password", "is empty"))
        }
        (Some(p), None) => Some(p),
        (None, Some(path)) => Some(read_secret("--etcd-password-file", &path)?),
        (None, None) => None,
    };
    match (username, password) {
        (Some(username), Some(password)) if !username.is_empty() => {
            Ok(Some(EtcdAuth { username, password }))
        }
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::new(
            "--etcd-username",
            "needs a password: CONFIG_SIDECAR_ETCD_PASSWORD or --etcd-password-file",
        )),
        (_, Some(_)) => Err(ConfigError::new(
            "--etcd-username",
            "a password was given but no username",
        )),
    }
}

/// TLS settings: all endpoints `https://` or none; a client key goes with a client certificate.
fn etcd_tls(
    endpoints: &[String],
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<EtcdTls>, ConfigError> {
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    if https != 0 && https != endpoints.len() {
        return Err(ConfigError::new(
            "--endpoints",
            "mixes http:// and https:// endpoints",
        ));
    }
    if https == 0 {
        if ca.is_some() || cert.is_some() || key.is_some() {
            return Err(ConfigError::new(
                "--etcd-ca-file",
                "TLS files given but the endpoints are http://; use https:// endpoints",
            ));
        }
        return Ok(None);
    }
    let (cert_pem, key_pem) = match (cert, key) {
        (Some(cert), Some(key)) => (
            Some(read_pem("--etcd-cert-file", &cert, "CERTIFICATE")?),
            Some(Secret::from(read_pem(
                "--etcd-key-file",
                &key,
                "PRIVATE KEY",
            )?)),
        ),
        (None, None) => (None, None),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "--etcd-key-file",
                "needed with --etcd-cert-file",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "--etcd-cert-file",
                "needed with --etcd-key-file",
            ))
        }
    };
    Ok(Some(EtcdTls {
        ca_pem: ca
            .map(|ca| read_pem("--etcd-ca-file", &ca, "CERTIFICATE"))
            .transpose()?,
        cert_pem,
        key_pem,
    }))
}

fn validate_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| ConfigError::new("--endpoints", format!("{endpoint:?} {why}"));
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| bad("is not a URL such as http://127.0.0.1:2379"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("must start with http:// or https://"));
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.host().is_empty() {
        return Err(bad("has no host"));
    }
    if authority.port_u16().is_none() {
        return Err(bad("has no port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must not have a path or query"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::config::{LogFormat, DEFAULT_ENDPOINTS, DEFAULT_LISTEN};

    fn cli(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["config-sidecar"];
        argv.extend_from_slice(args);
        Config::from_args(argv, Environment::Ignored).map_err(|e| e.to_string())
    }

    #[test]
    fn zero_is_a_duration_only_where_it_means_none() {
        let c = cli(&[
            "--prefix",
            "/c/",
            "--first-load-jitter",
            "0s",
            "--catch-up-jitter",
            "0s",
            "--alert-min-interval",
            "0s",
        ])
        .unwrap();
        assert!(c.sync.first_load_jitter.is_zero());
        assert!(c.sync.catch_up_jitter.is_zero());
        assert!(c.mode.alert_min_interval.is_zero());
        let e = cli(&["--prefix", "/c/", "--probe-interval", "0s"]).unwrap_err();
        assert!(e.contains("greater than zero"), "{e}");
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let c = cli(&["--prefix", "/config/app/"]).unwrap();
        assert_eq!(c.etcd.endpoints, vec![DEFAULT_ENDPOINTS.to_string()]);
        assert_eq!(c.http.listen, DEFAULT_LISTEN.parse::<SocketAddr>().unwrap());
        assert_eq!(c.sync.watch_deadline, Duration::from_secs(6));
        assert_eq!(c.log_format, LogFormat::Plain);
    }

    #[test]
    fn each_bad_setting_is_named() {
        let err = |args: &[&str]| cli(args).unwrap_err();
        assert!(err(&[]).contains("--prefix"));
        assert!(err(&["--prefix", "config/"]).contains("must start with '/'"));
        assert!(err(&["--prefix", "/c/", "--endpoints", "127.0.0.1:2379"]).contains("--endpoints"));
        assert!(err(&["--prefix", "/c/", "--endpoints", "http://h"]).contains("no port"));
        assert!(err(&["--prefix", "/c/", "--listen", "nowhere"]).contains("--listen"));
        assert!(err(&["--prefix", "/c/", "--log-format", "xml"]).contains("--log-format"));
        assert!(err(&["--prefix", "/c/", "--watch-deadline", "soon"]).contains("--watch-deadline"));
        assert!(err(&["--prefix", "/c/", "--config", "/nonexistent/x.toml"]).contains("--config"));
        assert!(err(&["--bogus"]).contains("--bogus"));
    }

    #[test]
    fn the_write_token_is_read_from_its_file_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let t = token.to_str().unwrap();
        let c = cli(&["--prefix", "/c/", "--allow-writes", "--write-token-file", t]).unwrap();
        assert!(c.writes.allowed);
        assert_eq!(
            c.writes.token.as_ref().map(Secret::expose),
            Some("s3cret-token")
        );
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug output shows the token"
        );
        std::fs::write(&token, "  \n").unwrap();
        assert!(cli(&["--prefix", "/c/", "--write-token-file", t])
            .unwrap_err()
            .contains("empty"));
        let missing = dir.path().join("nope");
        let e = cli(&[
            "--prefix",
            "/c/",
            "--write-token-file",
            missing.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(e.contains("--write-token-file"), "{e}");
        let e = cli(&["--prefix", "/c/", "--webhook", "ftp://x"]).unwrap_err();
        assert!(e.contains("--webhook"), "{e}");
    }

    #[test]
    fn file_fills_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "endpoints = [\"http://127.0.0.1:1\"]\nprefixes = [\"/f/\"]\nlisten = \"127.0.0.1:9\"\nwatch_deadline = \"3s\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = cli(&["--config", p, "--listen", "127.0.0.1:10"]).unwrap();
        assert_eq!(c.etcd.endpoints, vec!["http://127.0.0.1:1".to_string()]);
        assert_eq!(c.sync.prefixes.as_slice(), &["/f/".to_string()]);
        assert_eq!(c.http.listen.port(), 10);
        assert_eq!(c.sync.watch_deadline, Duration::from_secs(3));

        std::fs::write(&path, "prefixes = [\"/f/\"]\nunknown_key = 1\n").unwrap();
        let e = cli(&["--config", p]).unwrap_err();
        assert!(e.contains("--config") && e.contains("unknown_key"), "{e}");
    }

    #[test]
    fn render_tables_in_the_file_are_render_targets() {
        use crate::config::{Format, OnChange};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "prefixes = [\"/app/\"]\n\
                 [[render]]\nprefix = \"/app/web/\"\npath = \"{d}/web.yml\"\nmode = 0o640\n\
                 on_change = {{ command = [\"sh\", \"-c\", \"a; b, c\"], timeout = \"5s\" }}\n\
                 [[render]]\nprefix = \"/app/\"\npath = \"{d}/app.conf\"\nformat = \"env\"\n\
                 on_change = {{ signal = \"HUP\", pid_file = \"{d}/app.pid\" }}\n"
            ),
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = cli(&["--config", p]).unwrap();
        assert_eq!(c.render.len(), 2);
        assert_eq!(
            (c.render[0].format, c.render[0].mode),
            (Format::Yaml, 0o640)
        );
        assert_eq!(
            c.render[0].on_change,
            Some(OnChange::Command {
                argv: vec!["sh".into(), "-c".into(), "a; b, c".into()],
                timeout: Duration::from_secs(5)
            })
        );
        assert_eq!(c.render[1].format, Format::Env);
        assert!(matches!(
            c.render[1].on_change,
            Some(OnChange::Signal { .. })
        ));

        // --check-config prints them as inline tables, and that file reads back the same.
        let parsed =
            crate::config::settings::parse(["config-sidecar", "--config", p], Environment::Ignored)
                .unwrap();
        let described = parsed.describe();
        assert!(described.contains("render = [{ "), "{described}");
        std::fs::write(&path, &described).unwrap();
        assert_eq!(cli(&["--config", p]).unwrap().render, c.render);

        // A flag value is PREFIX=PATH or the same table as JSON, separated by semicolons.
        let c = cli(&[
            "--prefix",
            "/app/",
            "--render",
            &format!("/app/={d}/a.json;{{\"prefix\":\"/app/\",\"path\":\"{d}/b.properties\"}}"),
        ])
        .unwrap();
        assert_eq!(c.render.len(), 2);
        assert_eq!(c.render[1].format, Format::Properties);
    }

    #[test]
    fn etcd_tls_and_auth_settings_are_checked_and_secrets_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let cert = file(
            "c.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let key = file(
            "k.pem",
            "-----BEGIN PRIVATE KEY-----\nKEYBYTES\n-----END PRIVATE KEY-----\n",
        );
        let password = file("pw", "hunter2-secret\n");
        let https = ["--prefix", "/c/", "--endpoints", "https://127.0.0.1:2379"];
        let with = |more: &[&str]| {
            let mut args = https.to_vec();
            args.extend_from_slice(more);
            cli(&args)
        };
        let c = with(&[
            "--etcd-ca-file",
            &cert,
            "--etcd-cert-file",
            &cert,
            "--etcd-key-file",
            &key,
            "--etcd-username",
            "app",
            "--etcd-password-file",
            &password,
        ])
        .unwrap();
        let tls = c.etcd.tls.as_ref().unwrap();
        assert!(tls.ca_pem.is_some() && tls.cert_pem.is_some());
        let auth = c.etcd.auth.as_ref().unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.expose()),
            ("app", "hunter2-secret")
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("KEYBYTES"),
            "{debug}"
        );
        // https without a CA file trusts the system's roots.
        assert!(with(&[]).unwrap().etcd.tls.unwrap().ca_pem.is_none());

        let err = |more: &[&str]| with(more).unwrap_err();
        assert!(err(&["--etcd-cert-file", &cert]).contains("--etcd-key-file"));
        assert!(err(&["--etcd-key-file", &key]).contains("--etcd-cert-file"));
        assert!(err(&["--etcd-ca-file", &key]).contains("no PEM CERTIFICATE"));
        assert!(err(&["--etcd-cert-file", &cert, "--etcd-key-file", &cert]).contains("PRIVATE KEY"));
        assert!(err(&["--etcd-username", "app"]).contains("needs a password"));
        assert!(err(&["--etcd-password-file", &password]).contains("no username"));
        let both = err(&[
            "--etcd-username",
            "a",
            "--etcd-password",
            "x",
            "--etcd-password-file",
            &password,
        ]);
        assert!(both.contains("not both"), "{both}");
        let plain = cli(&["--prefix", "/c/", "--etcd-ca-file", &cert]).unwrap_err();
        assert!(plain.contains("https://"), "{plain}");
        let mixed = cli(&[
            "--prefix",
            "/c/",
            "--endpoints",
            "https://127.0.0.1:1,http://127.0.0.1:2",
        ])
        .unwrap_err();
        assert!(mixed.contains("mixes"), "{mixed}");
    }

    #[test]
    fn listening_beyond_loopback_must_be_asked_for() {
        let e = cli(&["--prefix", "/c/", "--listen", "0.0.0.0:7379"]).unwrap_err();
        assert!(e.contains("--allow-remote"), "{e}");
        let c = cli(&[
            "--prefix",
            "/c/",
            "--listen",
            "0.0.0.0:7379",
            "--allow-remote",
        ])
        .unwrap();
        assert!(c.http.allow_remote);
        assert!(cli(&["--prefix", "/c/", "--listen", "[::1]:7379"]).is_ok());
        let c = cli(&[
            "--prefix",
            "/c/",
            "--allowed-hosts",
            "Config.Local, sidecar",
        ])
        .unwrap();
        assert_eq!(c.http.allowed_hosts, ["config.local", "sidecar"]);
        let e = cli(&["--prefix", "/c/", "--allowed-hosts", "http://x/"]).unwrap_err();
        assert!(e.contains("--allowed-hosts"), "{e}");
    }
}
