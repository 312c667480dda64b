//! Keeps the documents honest: `docs/openapi.yaml` describes exactly the router's routes and
//! methods, the deployment files (compose, Kubernetes) give the sidecar only flags and
//! environment variables it has, probe only its real health paths, on its real port, the
//! settings table of `docs/configuration.md` is the schema's, and every relative link and
//! anchor of the README and `docs/` leads somewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use clap::CommandFactory;
use config_sidecar::config::{Cli, Config, Environment};
use config_sidecar::http::{app, route_paths};
use config_sidecar::mirror::store::Store;
use config_sidecar::mode::handle::ModeHandle;
use config_sidecar::ops::run::standalone_state;
use http::{Method, Request, StatusCode};
use tower::ServiceExt;
use yaml_rust2::{Yaml, YamlLoader};

fn load_yaml(path: &str) -> Vec<Yaml> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A router path in the spec's form: `{*key}` → `{key}`; `/v1/kv` and `/v1/kv/` are the keyed
/// route with an empty key.
fn spec_form(path: &str, all: &[&str]) -> String {
    let path = path.replace("{*", "{");
    let bare = path.trim_end_matches('/');
    all.iter()
        .map(|p| p.replace("{*", "{"))
        .find(|p| p.starts_with(&format!("{bare}/{{")))
        .unwrap_or(path)
}

fn router() -> axum::Router {
    let config = Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/c/"]).unwrap();
    let state = standalone_state(
        &config,
        Arc::new(Store::new()),
        Arc::new(ModeHandle::default()),
    );
    app(state)
}

/// Whether the router routes `method` on `path` (anything but its unknown-route and
/// method-not-allowed answers).
async fn routed(router: &axum::Router, method: &Method, path: &str) -> bool {
    let uri = path.replace("{key}", "c/k").replace("{prefix}", "c/");
    let request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        return false;
    }
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    !String::from_utf8_lossy(&body).contains("\"unknown_route\"")
}

#[tokio::test]
async fn the_openapi_spec_lists_exactly_the_routes_and_methods_served() {
    let spec = &load_yaml("docs/openapi.yaml")[0];
    let paths = spec["paths"].as_hash().expect("the spec has paths");
    let mut documented = BTreeSet::new();
    let mut documented_methods = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().unwrap().to_string();
        for (method, _) in item.as_hash().unwrap() {
            let method = method.as_str().unwrap().to_uppercase();
            if method != "PARAMETERS" {
                documented_methods.insert((path.clone(), method));
            }
        }
        documented.insert(path);
    }
    let all = route_paths();
    let served: BTreeSet<String> = all.iter().map(|p| spec_form(p, &all)).collect();
    assert_eq!(
        served, documented,
        "router paths (left) and spec paths (right) differ"
    );

    let router = router();
    let candidates = [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::POST,
        Method::PATCH,
    ];
    for path in &documented {
        for method in &candidates {
            let in_spec = documented_methods.contains(&(path.clone(), method.to_string()));
            assert_eq!(
                routed(&router, method, path).await,
                in_spec,
                "{method} {path}: served and documented disagree"
            );
        }
    }
}

/// Where the Dockerfile installs the binary; probes and health checks must call this path.
const BINARY: &str = "/usr/local/bin/config-sidecar";

/// How a deployment file runs the sidecar.
struct Invocation {
    /// Which file and service, for messages.
    what: String,
    /// Arguments after the binary.
    args: Vec<String>,
    /// `CONFIG_SIDECAR_*` (and other) environment variables.
    env: Vec<(String, String)>,
    /// Files the platform mounts from a secret store (paths inside the container).
    secret_files: Vec<String>,
}

impl Invocation {
    /// Checks every flag and `CONFIG_SIDECAR_*` variable exists and the whole configuration is
    /// valid (values included), and returns the listen port.
    fn check(&self) -> u16 {
        let command = Cli::command();
        let mut argv = vec!["config-sidecar".to_string()];
        // The snapshot directory exists in the container only: validate the rest with a
        // directory that exists here (the volume checks below cover the path itself).
        let here = tempfile::tempdir().unwrap();
        for (name, value) in &self.env {
            if !name.starts_with("CONFIG_SIDECAR_") {
                continue;
            }
            let value = if name == "CONFIG_SIDECAR_SNAPSHOT" {
                let file = Path::new(value).file_name().unwrap();
                here.path().join(file).display().to_string()
            } else if name == "CONFIG_SIDECAR_RENDER" {
                // Rendered files too: their volume is checked by `rendered_dirs`.
                let moved: Vec<String> = value
                    .split(';')
                    .map(|target| {
                        let (prefix, path) = target.split_once('=').unwrap();
                        let file = Path::new(path).file_name().unwrap();
                        format!("{prefix}={}", here.path().join(file).display())
                    })
                    .collect();
                moved.join(";")
            } else if self.secret_files.contains(value) {
                // Stand-ins for the mounted secrets, of the kind the setting expects.
                let file = here.path().join(Path::new(value).file_name().unwrap());
                let pem =
                    |kind: &str| format!("-----BEGIN {kind}-----\nAA==\n-----END {kind}-----\n");
                let text = match name.as_str() {
                    "CONFIG_SIDECAR_ETCD_KEY_FILE" => pem("PRIVATE KEY"),
                    "CONFIG_SIDECAR_ETCD_CA_FILE" | "CONFIG_SIDECAR_ETCD_CERT_FILE" => {
                        pem("CERTIFICATE")
                    }
                    _ => "stand-in secret".into(),
                };
                std::fs::write(&file, text).unwrap();
                file.display().to_string()
            } else {
                value.clone()
            };
            let arg = command
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
                .unwrap_or_else(|| panic!("{}: no setting reads {name}", self.what));
            argv.push(format!("--{}", arg.get_long().unwrap()));
            argv.push(value);
        }
        for arg in &self.args {
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    command.get_arguments().any(|a| a.get_long() == Some(flag)),
                    "{}: no flag --{flag}",
                    self.what
                );
            }
        }
        argv.extend(self.args.iter().cloned());
        let config = Config::from_args(&argv, Environment::Ignored)
            .unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", self.what));
        config.http.listen.port()
    }
}

/// A health check command: the binary, `--healthcheck`, and the path it asks (default /healthz).
fn healthcheck_path(what: &str, command: &[String]) -> String {
    assert_eq!(command.first().map(String::as_str), Some(BINARY), "{what}");
    assert_eq!(
        command.get(1).map(String::as_str),
        Some("--healthcheck"),
        "{what}"
    );
    let path = command.get(2).cloned().unwrap_or_else(|| "/healthz".into());
    let all = route_paths();
    assert!(
        all.contains(&path.as_str()),
        "{what}: {path} is not a route"
    );
    path
}

/// The directories of the files a deployment's `CONFIG_SIDECAR_RENDER` renders.
fn rendered_dirs(env: &[(String, String)]) -> Vec<String> {
    env.iter()
        .filter(|(name, _)| name == "CONFIG_SIDECAR_RENDER")
        .flat_map(|(_, value)| value.split(';'))
        .map(|target| {
            let path = Path::new(target.split_once('=').unwrap().1);
            path.parent().unwrap().display().to_string()
        })
        .collect()
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_dockerfile_compose_and_kubernetes_files_match_the_binary() {
    // Dockerfile: the binary path, the default listen port it exposes, the health check.
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/Dockerfile"))
            .unwrap();
    assert!(dockerfile.contains(&format!("COPY --from=binary /src/config-sidecar {BINARY}")));
    // The image's binary is the statically linked one, built by the script that says how.
    assert!(dockerfile.contains("COPY scripts/build-static.sh ./scripts/"));
    assert!(
        dockerfile.contains("RUN cp \"$(scripts/build-static.sh --locked)\" /src/config-sidecar")
    );
    let env: Vec<(String, String)> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let docker_port = Invocation {
        what: "Dockerfile".into(),
        args: vec!["--prefix".into(), "/x/".into()],
        env,
        secret_files: Vec::new(),
    }
    .check();
    assert!(dockerfile.contains(&format!("EXPOSE {docker_port}")));
    let check = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("CMD "))
        .expect("a HEALTHCHECK CMD");
    let check: Vec<String> = serde_json::from_str(check).unwrap();
    assert_eq!(healthcheck_path("Dockerfile", &check), "/healthz");
    assert!(
        dockerfile.contains("USER nonroot"),
        "the image runs as non-root"
    );
    // The build stage installs what scripts/install-deps.sh names for etcd-client's build
    // (protoc, and the well-known protos that protoc alone lacks).
    let install = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps.sh"),
    )
    .unwrap();
    for need in ["[protoc]=", "[well_known_protos]="] {
        let package = install
            .lines()
            .find_map(|l| l.trim().strip_prefix(need))
            .unwrap_or_else(|| panic!("install-deps.sh names a package for {need}"));
        assert!(
            dockerfile.contains(&format!(" {package} ")),
            "the Dockerfile's build stage installs {package}"
        );
    }

    // compose: the sidecar service and the app sharing its network namespace.
    let compose = &load_yaml("docker/compose.yml")[0];
    let sidecar = &compose["services"]["sidecar"];
    let env: Vec<(String, String)> = sidecar["environment"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str().unwrap().to_string(),
            )
        })
        .collect();
    let rendered = rendered_dirs(&env);
    let port = Invocation {
        what: "compose sidecar".into(),
        args: strings(&sidecar["command"]),
        env,
        secret_files: Vec::new(),
    }
    .check();
    let test = strings(&sidecar["healthcheck"]["test"]);
    assert_eq!(test[0], "CMD");
    assert_eq!(
        healthcheck_path("compose healthcheck", &test[1..]),
        "/healthz"
    );
    let app = &compose["services"]["app"];
    assert_eq!(app["network_mode"].as_str(), Some("service:sidecar"));
    let reads = strings(&app["command"]).join(" ");
    assert!(
        reads.contains(&format!("localhost:{port}/v1/")),
        "the demo app reads the sidecar on its port: {reads}"
    );
    let volumes = strings(&sidecar["volumes"]);
    let snapshot_dir = volumes[0].split(':').nth(1).unwrap().to_string();
    assert!(sidecar["environment"]["CONFIG_SIDECAR_SNAPSHOT"]
        .as_str()
        .unwrap()
        .starts_with(&snapshot_dir));
    // Each rendered file is on a volume the app mounts too.
    assert!(!rendered.is_empty(), "compose shows a rendered file");
    let app_volumes = strings(&app["volumes"]);
    for dir in &rendered {
        let volume = volumes
            .iter()
            .find_map(|v| v.strip_suffix(&format!(":{dir}")))
            .unwrap_or_else(|| panic!("compose: {dir} is not a sidecar volume: {volumes:?}"));
        assert!(
            app_volumes
                .iter()
                .any(|v| v.starts_with(&format!("{volume}:{dir}"))),
            "compose: the app mounts {volume} at {dir}: {app_volumes:?}"
        );
    }

    // Kubernetes: the sidecar container of the Deployment.
    let deployment = &load_yaml("docker/k8s/deployment.yaml")[0];
    assert_eq!(deployment["kind"].as_str(), Some("Deployment"));
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().unwrap();
    assert!(containers.len() >= 2, "the app and the sidecar");
    let sidecar = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("config-sidecar"))
        .expect("a config-sidecar container");
    // Files mounted from Secrets: mount path + item path, for each secret volume.
    let volumes = pod["volumes"].as_vec().unwrap();
    let mut secret_files = Vec::new();
    let mut secret_names = Vec::new();
    for mount in sidecar["volumeMounts"].as_vec().unwrap() {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("every mount names a volume");
        if let Some(secret) = volume["secret"]["secretName"].as_str() {
            secret_names.push(secret.to_string());
            for item in volume["secret"]["items"].as_vec().unwrap() {
                let dir = mount["mountPath"].as_str().unwrap();
                secret_files.push(format!("{dir}/{}", item["path"].as_str().unwrap()));
            }
        }
    }
    let env: Vec<(String, String)> = sidecar["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => {
                    let from = e["valueFrom"]["secretKeyRef"]["name"].as_str();
                    assert!(
                        from.is_some_and(|s| secret_names.iter().any(|n| n == s)),
                        "{name}: from the same Secret as the mounted files"
                    );
                    "stand-in secret".into()
                }
            };
            (name, value)
        })
        .collect();
    for (name, value) in &env {
        if name.starts_with("CONFIG_SIDECAR_ETCD_") && name.ends_with("_FILE") {
            assert!(
                secret_files.contains(value),
                "{name}={value} is not mounted from a Secret"
            );
        }
    }
    assert!(
        env.iter().any(|(n, _)| n == "CONFIG_SIDECAR_ETCD_KEY_FILE"),
        "etcd TLS from a Secret"
    );
    let rendered = rendered_dirs(&env);
    let port = Invocation {
        what: "k8s config-sidecar".into(),
        args: strings(&sidecar["args"]),
        env,
        secret_files,
    }
    .check();
    // It listens on the pod's loopback: no containerPort (one would say the pod's IP serves it,
    // and podman's `kube play` publishes it on the host, where two replicas collide).
    assert!(
        sidecar["ports"].is_badvalue(),
        "k8s: a port declared for a loopback listener"
    );
    let readiness = strings(&sidecar["readinessProbe"]["exec"]["command"]);
    assert_eq!(healthcheck_path("k8s readiness", &readiness), "/readyz");
    let liveness = strings(&sidecar["livenessProbe"]["exec"]["command"]);
    assert_eq!(healthcheck_path("k8s liveness", &liveness), "/healthz");
    assert!(!sidecar["resources"]["limits"]["memory"].is_badvalue());
    let mount = sidecar["volumeMounts"][0]["mountPath"].as_str().unwrap();
    let snapshot = sidecar["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("CONFIG_SIDECAR_SNAPSHOT"))
        .and_then(|e| e["value"].as_str())
        .unwrap();
    assert!(
        snapshot.starts_with(mount),
        "the snapshot lives on the mounted volume"
    );
    let volume = sidecar["volumeMounts"][0]["name"].as_str().unwrap();
    assert!(pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|v| v["name"].as_str() == Some(volume) && !v["emptyDir"].is_badvalue()));
    let app = containers
        .iter()
        .find(|c| c["name"].as_str() != Some("config-sidecar"))
        .unwrap();
    let reads = strings(&app["args"]).join(" ");
    assert!(reads.contains(&format!("localhost:{port}/v1/")), "{reads}");
    // Each rendered file is on an emptyDir the app mounts too.
    assert!(!rendered.is_empty(), "the manifest shows a rendered file");
    let mounted = |container: &Yaml, dir: &str| {
        container["volumeMounts"]
            .as_vec()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"].as_str() == Some(dir))
            .and_then(|m| m["name"].as_str())
            .map(str::to_string)
    };
    for dir in &rendered {
        let volume = mounted(sidecar, dir).unwrap_or_else(|| panic!("k8s: {dir} not mounted"));
        assert_eq!(
            mounted(app, dir),
            Some(volume.clone()),
            "k8s: the app mounts {dir}"
        );
        assert!(pod["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|v| v["name"].as_str() == Some(&volume) && !v["emptyDir"].is_badvalue()));
    }
}

/// A setting's default as both settings tables write it: in backticks, or a dash for none.
fn default_cell(setting: &config_sidecar::config::settings::Setting) -> String {
    setting
        .default
        .as_ref()
        .map_or("—".to_string(), |d| format!("`{d}`"))
}

/// The settings table of `docs/configuration.md`, as the schema says it must read: one row per setting, in the
/// schema's order, with its section, flag, environment variable, default, whether SIGHUP applies
/// it, and its help text.
fn settings_table() -> String {
    use config_sidecar::config::settings::{schema, LIVE};
    let mut table = String::from(
        "| setting (file key) | flag | environment variable | default | SIGHUP | what |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for s in schema() {
        let doc = s.doc.replace(LIVE, "").replace('|', "\\|");
        table.push_str(&format!(
            "| `{}` ({}) | `--{}` | `{}` | {} | {} | {} |\n",
            s.name,
            s.section,
            s.flag,
            s.env,
            default_cell(&s),
            if s.live { "applied" } else { "restart" },
            doc.trim()
        ));
    }
    table
}

#[test]
fn the_configuration_page_settings_table_is_the_schema() {
    let page = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    const START: &str = "<!-- settings: checked against the schema by tests/docs.rs -->\n";
    const END: &str = "<!-- end of settings -->";
    let start = page
        .find(START)
        .expect("docs/configuration.md marks its settings table")
        + START.len();
    let end = start + page[start..].find(END).expect("the table's end is marked");
    let expected = settings_table();
    assert!(
        page[start..end] == expected,
        "docs/configuration.md's settings table differs from the schema; it should read:\n{expected}"
    );
}

/// `docs/layout.md` names every source file: each folder's row lists its files by name (a file
/// in a subfolder as `sub/` or `sub/file.rs`), so a file added or moved without the map fails here.
#[test]
fn the_layout_page_names_every_source_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/layout.md")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root.join("src")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_file() {
            if !page.contains(&format!("src/{name}")) {
                missing.push(format!("src/{name}"));
            }
            continue;
        }
        // A folder's row: from its name to the end of that table line.
        let Some(at) = page.find(&format!("`src/{name}/`")) else {
            missing.push(format!("src/{name}/"));
            continue;
        };
        let row = page[at..].lines().next().unwrap();
        for file in std::fs::read_dir(&path).unwrap() {
            let file = file.unwrap().path();
            let file = file.file_name().unwrap().to_string_lossy().to_string();
            if !row.contains(&format!("`{file}`")) && !row.contains(&format!("`{file}/`")) {
                missing.push(format!("src/{name}/{file}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/layout.md does not name {missing:?}"
    );
}

/// The README lists a few settings by hand (`| `--flag` | `ENV` | default | what |`): each row's
/// environment variable and default must be the schema's, so the front door cannot drift from it.
#[test]
fn the_readme_settings_rows_agree_with_the_schema() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let schema = config_sidecar::config::settings::schema();
    let mut rows = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let flag = cells[1].trim_matches('`').trim_start_matches("--");
        let setting = schema
            .iter()
            .find(|s| s.flag == flag)
            .unwrap_or_else(|| panic!("README lists --{flag}, which the schema does not have"));
        let default = default_cell(setting);
        assert_eq!(
            cells[2],
            format!("`{}`", setting.env),
            "README row of --{flag}"
        );
        assert_eq!(cells[3], default, "README row of --{flag}");
        rows += 1;
    }
    assert!(
        rows >= 5,
        "the README's settings rows were not found ({rows})"
    );
}

/// A markdown text without its fenced code blocks, whose lines are neither headings nor prose.
fn outside_fences(markdown: &str) -> String {
    let mut fenced = false;
    let mut kept = String::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// GitHub's anchor for a heading: lower case, every character but letters, digits, spaces,
/// hyphens and underscores dropped, spaces made hyphens.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown text's headings; a repeated slug gets `-1`, `-2`… as on GitHub.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen = BTreeMap::<String, usize>::new();
    let mut anchors = BTreeSet::new();
    for line in outside_fences(markdown).lines() {
        let text = line.trim_start_matches('#');
        if text.len() == line.len() || line.len() - text.len() > 6 || !text.starts_with(' ') {
            continue;
        }
        let base = slug(text.trim().trim_end_matches('#').trim_end());
        let count = seen.entry(base.clone()).or_default();
        anchors.insert(match *count {
            0 => base,
            n => format!("{base}-{n}"),
        });
        *count += 1;
    }
    anchors
}

/// The targets of a markdown text's `[text](target)` links, outside code: fenced blocks and
/// inline code spans (taken paragraph by paragraph, as a span may wrap a line) are skipped.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for paragraph in outside_fences(markdown).split("\n\n") {
        // Between a span's opening and closing backtick is code: every odd piece.
        for prose in paragraph.split('`').step_by(2) {
            for (at, _) in prose.match_indices("](") {
                let rest = &prose[at + 2..];
                if let Some(end) = rest.find(')') {
                    let target = rest[..end].split_whitespace().next().unwrap_or_default();
                    targets.push(target.to_string());
                }
            }
        }
    }
    targets
}

/// What is wrong with each relative link of the markdown file `file` (inside `root`): a target
/// that is not a file or directory of the repository, or an anchor no heading of its page has.
fn broken_links(root: &Path, file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let name = file.strip_prefix(root).unwrap().display().to_string();
    let mut broken = Vec::new();
    for target in link_targets(&text) {
        if ["http://", "https://", "mailto:"]
            .iter()
            .any(|scheme| target.starts_with(scheme))
        {
            continue;
        }
        let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
        let page = if path.is_empty() {
            file.to_path_buf()
        } else {
            file.parent().unwrap().join(path)
        };
        let inside = page
            .canonicalize()
            .is_ok_and(|p| p.starts_with(root.canonicalize().unwrap()));
        if !inside {
            broken.push(format!("{name}: {target}: no such file in the repository"));
        } else if !anchor.is_empty() {
            let headings = std::fs::read_to_string(&page).unwrap_or_default();
            if !anchors(&headings).contains(anchor) {
                broken.push(format!("{name}: {target}: no heading has that anchor"));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_and_anchor_in_the_readme_and_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let broken: Vec<String> = pages.iter().flat_map(|p| broken_links(root, p)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_checker_finds_a_missing_file_and_a_missing_anchor() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("other.md"),
        "# Other\n\n## Same\n\n## Same\n\n```sh\n# not a heading\n```\n",
    )
    .unwrap();
    let page = root.path().join("page.md");
    std::fs::write(
        &page,
        "# A `page`: its title\n\n\
         [fine](other.md#same-1), [also](#a-page-its-title), [web](https://example.com/x#y)\n\
         [gone](missing.md) and [wrong](other.md#same-2), [not](#not-a-heading)\n\n\
         `[code](missing.md)` and\n\n```\n[fenced](missing.md)\n```\n",
    )
    .unwrap();
    assert_eq!(
        broken_links(root.path(), &page),
        [
            "page.md: missing.md: no such file in the repository",
            "page.md: other.md#same-2: no heading has that anchor",
            "page.md: #not-a-heading: no heading has that anchor",
        ]
    );
}
