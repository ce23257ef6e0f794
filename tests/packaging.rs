//! The files of `deploy/` (Dockerfile, compose stack, Prometheus and
//! Grafana configuration, systemd unit), checked without a container
//! runtime: each parses, names only metrics that exist, and agrees with the
//! workspace and with the others on names, paths and ports. The unit goes
//! through `systemd-analyze verify` where that command exists, and the NATS
//! configuration through `nats-server -t` where `AMENDS_NATS_SERVER` names
//! one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use amends_nats::metrics as m;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    let full = root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn yaml(path: &str) -> Yaml {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: not YAML: {e}"))
}

/// `map[key]` for a YAML mapping, as a string where it is a scalar.
fn get<'a>(value: &'a Yaml, key: &str) -> &'a Yaml {
    value
        .get(key)
        .unwrap_or_else(|| panic!("no key {key:?} in {value:?}"))
}

fn str_of(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// The port of `host:port` (or of `a:b:port`, a compose port mapping).
fn port_of(addr: &str) -> u16 {
    let port = addr.rsplit(':').next().unwrap();
    port.trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or_else(|e| panic!("no port in {addr:?}: {e}"))
}

// --- metrics -----------------------------------------------------------------

/// Every series name `serve --metrics-addr` exports: the constants of
/// `amends_nats::metrics`, a histogram's `_bucket`, `_sum` and `_count`, and
/// the build info gauge of the binary (`src/metrics.rs`, read from source:
/// the binary is no library).
fn exported_series() -> BTreeSet<String> {
    let plain = [
        m::DECISIONS,
        m::DUPLICATES,
        m::CONFLICTS,
        m::OP_IDS_REFUSED,
        m::OPTIMISTIC,
        m::APOLOGIES,
        m::DEAD_LETTERS,
        m::APPLIED_POSITION,
        m::LAG,
        m::PARTITION_STATE,
        m::PARTITION_RESTARTS,
        m::FENCE_BUSY,
    ];
    let histograms = [m::BATCH_LEN, m::COMMIT_SECONDS, m::PUBLISH_SECONDS];
    let mut names: BTreeSet<String> = plain.iter().map(|s| s.to_string()).collect();
    for h in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    let source = read("src/metrics.rs");
    let build_info = source
        .lines()
        .find_map(|l| l.strip_prefix("pub const BUILD_INFO: &str = \""))
        .and_then(|rest| rest.strip_suffix("\";"))
        .expect("src/metrics.rs declares BUILD_INFO");
    names.insert(build_info.to_string());
    names
}

/// The `amends_*` metric names an expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("amends_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
        if !before.is_some_and(is_name) {
            names.push(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    names
}

/// Every `expr` (a PromQL query) anywhere in a dashboard.
fn exprs(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Json::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The metric names a dashboard queries that amends does not export.
fn unknown_metrics(dashboard: &Json) -> Vec<String> {
    let known = exported_series();
    let mut all = Vec::new();
    exprs(dashboard, &mut all);
    all.iter()
        .flat_map(|e| metric_names(e))
        .filter(|name| !known.contains(name))
        .collect()
}

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/dashboards/amends.json"))
        .expect("the dashboard is JSON")
}

#[test]
fn dashboard_names_only_exported_metrics() {
    let dashboard = dashboard();
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(
        all.len() >= 10,
        "expected the panels' queries, found {all:?}"
    );
    assert_eq!(unknown_metrics(&dashboard), Vec::<String>::new());
}

#[test]
fn the_metric_check_catches_a_name_that_does_not_exist() {
    // The check above, against dashboards that are wrong.
    let bad = serde_json::json!({"panels": [{"targets": [
        {"expr": "sum(rate(amends_nonexistent_total[1m]))"},
        {"expr": "amends_lag_bucket + amends_lag"},
        {"expr": "histogram_quantile(0.5, rate(amends_commit_seconds_bucket[1m]))"},
    ]}]});
    assert_eq!(
        unknown_metrics(&bad),
        ["amends_nonexistent_total", "amends_lag_bucket"]
    );
    assert_eq!(
        metric_names("x_amends_lag + amends_lag{partition=\"1\"}"),
        ["amends_lag"]
    );
}

#[test]
fn dashboard_has_the_panels_an_operator_needs() {
    let dashboard = dashboard();
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let queried: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    // Decision rate by outcome, refusals by reason, apology rate, lag,
    // commit latency, restarts, partition state, fence busy.
    let commit_buckets = format!("{}_bucket", m::COMMIT_SECONDS);
    for needed in [
        m::DECISIONS,
        m::OP_IDS_REFUSED,
        m::APOLOGIES,
        m::OPTIMISTIC,
        m::LAG,
        &commit_buckets,
        m::PARTITION_RESTARTS,
        m::PARTITION_STATE,
        m::FENCE_BUSY,
    ] {
        assert!(queried.contains(needed), "no panel queries {needed}");
    }
    assert!(
        all.iter()
            .any(|e| e.contains("sum by (outcome)") && e.contains(m::DECISIONS)),
        "no decision rate by outcome"
    );
    assert!(
        all.iter()
            .any(|e| e.contains("histogram_quantile(0.99") && e.contains(&commit_buckets)),
        "no p99 commit latency"
    );

    // Every panel is distinct and reads the provisioned data source.
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yaml");
    let uid = str_of(get(&get(&datasources, "datasources")[0], "uid"));
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(panel["gridPos"].is_object(), "{title}: no gridPos");
        for source in std::iter::once(&panel["datasource"]).chain(
            panel["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| &t["datasource"]),
        ) {
            assert_eq!(source["uid"], Json::String(uid.clone()), "{title}");
        }
    }
}

// --- the compose stack ---------------------------------------------------------

fn compose() -> Yaml {
    yaml("deploy/compose.yaml")
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    get(get(compose, "services"), name)
}

/// A service's `environment` mapping.
fn environment(service: &Yaml) -> BTreeMap<String, String> {
    get(service, "environment")
        .as_mapping()
        .expect("environment is a mapping")
        .iter()
        .map(|(k, v)| (str_of(k), str_of(v)))
        .collect()
}

/// A service's volumes as (source, target) pairs.
fn volumes(service: &Yaml) -> Vec<(String, String)> {
    get(service, "volumes")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| {
            let v = str_of(v);
            let mut parts = v.split(':');
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            )
        })
        .collect()
}

/// The port amends serves its metrics on in the compose stack.
fn compose_metrics_port() -> u16 {
    port_of(&environment(service(&compose(), "amends"))["AMENDS_METRICS_ADDR"])
}

#[test]
fn prometheus_scrapes_amends_where_compose_serves_its_metrics() {
    let prometheus = yaml("deploy/prometheus.yml");
    let jobs = get(&prometheus, "scrape_configs").as_sequence().unwrap();
    let job = jobs
        .iter()
        .find(|j| str_of(get(j, "job_name")) == "amends")
        .expect("a scrape job named amends");
    assert_eq!(str_of(get(job, "metrics_path")), "/metrics");
    let targets: Vec<String> = get(&get(job, "static_configs")[0], "targets")
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(
        targets,
        [format!("amends:{}", compose_metrics_port())],
        "the scrape target is the compose service `amends` on AMENDS_METRICS_ADDR's port"
    );
}

#[test]
fn compose_services_agree_on_names_ports_and_files() {
    let compose = compose();
    let names: BTreeSet<String> = get(&compose, "services")
        .as_mapping()
        .unwrap()
        .keys()
        .map(str_of)
        .collect();
    assert_eq!(
        names,
        ["amends", "grafana", "nats", "prometheus"]
            .map(String::from)
            .into()
    );

    // Every bind-mounted file or folder is in deploy/.
    for name in &names {
        let Some(_) = service(&compose, name).get("volumes") else {
            continue;
        };
        for (source, _) in volumes(service(&compose, name)) {
            if source.starts_with('.') {
                let path = root().join("deploy").join(&source);
                assert!(path.exists(), "{name} mounts {source}: missing");
            }
        }
    }

    // NATS: the version scripts/setup pins, JetStream on, its port the one
    // amends connects to.
    let nats = service(&compose, "nats");
    let setup = read("scripts/setup");
    let pinned = setup
        .lines()
        .find_map(|l| l.strip_prefix("NATS_SERVER_VERSION="))
        .expect("scripts/setup pins nats-server");
    assert_eq!(str_of(get(nats, "image")), format!("nats:{pinned}"));
    let conf = nats_conf();
    assert!(conf.contains("jetstream {"), "JetStream is not on");
    let amends = service(&compose, "amends");
    let env = environment(amends);
    assert_eq!(
        env["AMENDS_NATS_URL"],
        format!("nats://nats:{}", nats_conf_port())
    );
    assert!(env["AMENDS_PARTITIONS"].parse::<u32>().unwrap() > 0);

    // amends: built from deploy/Dockerfile, its store in a volume at the
    // data dir, restarted on exit, health on its metrics port.
    let build = get(amends, "build");
    let context = root().join("deploy").join(str_of(get(build, "context")));
    let dockerfile = context.join(str_of(get(build, "dockerfile")));
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        root().join("deploy/Dockerfile").canonicalize().unwrap()
    );
    assert!(context.join(".dockerignore").exists());
    assert_eq!(str_of(get(amends, "restart")), "unless-stopped");
    let data_dir = &env["AMENDS_DATA_DIR"];
    assert!(
        volumes(amends).iter().any(|(_, target)| target == data_dir),
        "no volume at {data_dir}"
    );
    let port = compose_metrics_port();
    let health: Vec<String> = get(get(amends, "healthcheck"), "test")
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert!(
        health
            .iter()
            .any(|a| a.ends_with(&format!("127.0.0.1:{port}/readyz"))),
        "{health:?}"
    );
    let published: Vec<u16> = get(amends, "ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| port_of(&str_of(p)))
        .collect();
    assert_eq!(published, [port]);

    // Grafana: the dashboards folder is mounted where the provider looks,
    // the home dashboard is the amends one.
    let grafana = service(&compose, "grafana");
    let provider = yaml("deploy/grafana/provisioning/dashboards/amends.yaml");
    let path = str_of(get(get(&get(&provider, "providers")[0], "options"), "path"));
    let mounts = volumes(grafana);
    assert!(
        mounts
            .iter()
            .any(|(s, t)| s == "./grafana/dashboards" && t == &path),
        "{mounts:?} does not mount ./grafana/dashboards at {path}"
    );
    assert!(
        mounts
            .iter()
            .any(|(s, t)| s == "./grafana/provisioning" && t == "/etc/grafana/provisioning")
    );
    assert_eq!(
        environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"],
        format!("{path}/amends.json")
    );

    // Prometheus reads the mounted config; Grafana's data source is it.
    let prometheus = service(&compose, "prometheus");
    assert!(volumes(prometheus).contains(&(
        "./prometheus.yml".to_string(),
        "/etc/prometheus/prometheus.yml".to_string()
    )));
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yaml");
    assert_eq!(
        str_of(get(&get(&datasources, "datasources")[0], "url")),
        "http://prometheus:9090"
    );
}

fn nats_conf() -> String {
    read("deploy/nats.conf")
}

fn nats_conf_port() -> u16 {
    nats_conf()
        .lines()
        .find_map(|l| l.trim().strip_prefix("port:"))
        .expect("deploy/nats.conf sets port")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn nats_conf_is_valid() {
    assert_eq!(nats_conf_port(), 4222);
    assert!(nats_conf().contains("sync_interval: always"));
    match std::env::var_os("AMENDS_NATS_SERVER") {
        Some(server) => {
            let out = Command::new(&server)
                .arg("-t")
                .arg("-c")
                .arg(root().join("deploy/nats.conf"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "nats-server -t refused deploy/nats.conf: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => eprintln!(
            "AMENDS_NATS_SERVER unset: deploy/nats.conf checked for its port and sync_interval only, not by nats-server -t"
        ),
    }
}

// --- the Dockerfile ----------------------------------------------------------

/// The Dockerfile's instructions, continuation lines joined, comments and
/// the parser directive left out: (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (op, args) = current.split_once(' ').unwrap();
                out.push((op.to_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

fn manifest() -> toml::Table {
    read("Cargo.toml").parse().unwrap()
}

#[test]
fn dockerfile_builds_the_workspace_binary_and_exposes_the_metrics_port() {
    let instructions = dockerfile();
    let all = |op: &str| -> Vec<String> {
        instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.clone())
            .collect()
    };
    let manifest = manifest();
    let package = manifest["package"]["name"].as_str().unwrap();
    let bins: Vec<&str> = manifest["bin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert!(bins.contains(&"amends"));

    // Two stages: rust at the workspace's rust-version, then the same
    // Debian release slim (the binary's glibc is the one it runs on).
    let from = all("FROM");
    assert_eq!(from.len(), 2, "{from:?}");
    let rust_version = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    let builder = from[0]
        .strip_prefix(&format!("rust:{rust_version}-"))
        .unwrap_or_else(|| panic!("{} is not rust:{rust_version}-<debian>", from[0]));
    let (suite, stage) = builder.split_once(" AS ").unwrap();
    assert_eq!(from[1], format!("debian:{suite}-slim"));

    // The build: the root package, locked; the binary taken from its path.
    let build = all("RUN")
        .into_iter()
        .find(|r| r.contains("cargo build"))
        .expect("a cargo build step");
    assert!(
        build.contains(&format!("cargo build --release --locked -p {package}")),
        "{build}"
    );
    assert!(build.contains("target/release/amends "), "{build}");
    let copy = all("COPY")
        .into_iter()
        .find(|c| c.starts_with("--from="))
        .unwrap();
    assert_eq!(
        copy,
        format!("--from={stage} /out/amends /usr/local/bin/amends")
    );
    assert!(build.contains("/out/amends"), "{build}");

    // Runs as a user, not root; serve by default.
    assert_eq!(all("USER"), ["amends"]);
    assert_eq!(all("ENTRYPOINT"), [r#"["amends"]"#]);
    assert_eq!(all("CMD"), [r#"["serve"]"#]);

    // The metrics port is the one exposed, checked by the health check and
    // used by compose; the volume is the data dir.
    let env = all("ENV").join(" ");
    let setting = |key: &str| -> String {
        env.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no ENV {key}"))
            .to_string()
    };
    let port = port_of(&setting("AMENDS_METRICS_ADDR"));
    assert_eq!(all("EXPOSE"), [port.to_string()]);
    assert_eq!(port, compose_metrics_port());
    let health = all("HEALTHCHECK");
    assert!(
        health[0].contains(&format!("\"http://127.0.0.1:{port}/healthz\"")),
        "{health:?}"
    );
    assert_eq!(
        all("VOLUME"),
        [format!("[\"{}\"]", setting("AMENDS_DATA_DIR"))]
    );

    // The build context leaves out build output and local tools.
    let ignore = read(".dockerignore");
    let ignored: BTreeSet<&str> = ignore.lines().collect();
    for entry in ["target/", ".tools/", ".amends-dev/", "fuzz/target/", ".git"] {
        assert!(ignored.contains(entry), ".dockerignore lacks {entry}");
    }
}

// --- the systemd unit --------------------------------------------------------

/// A unit file's sections: section -> key -> values (a key may repeat).
fn unit_sections(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line:?}"));
        let section = section.clone().expect("a key before any section");
        sections
            .entry(section)
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    sections
}

const UNIT: &str = "deploy/amends.service";

#[test]
fn systemd_unit_restarts_serve_and_keeps_its_state() {
    let sections = unit_sections(&read(UNIT));
    let names: Vec<&String> = sections.keys().collect();
    assert_eq!(names, ["Install", "Service", "Unit"]);
    let service = &sections["Service"];
    let one = |key: &str| -> &str {
        match service.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("[Service] {key}: {other:?}"),
        }
    };
    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    assert_eq!(
        exec,
        [
            "/usr/local/bin/amends",
            "serve",
            "--config",
            "/etc/amends/amends.toml"
        ]
    );
    // serve exits non-zero on a lost lease, a fence or a store failure and
    // expects to be started again: on every exit, without a start limit.
    assert_eq!(one("Restart"), "always");
    assert!(one("RestartSec").ends_with('s'));
    assert_eq!(
        sections["Unit"]["StartLimitIntervalSec"],
        ["0"],
        "a start limit would leave amends down after a few quick exits"
    );
    assert_eq!(one("Type"), "simple");
    assert_eq!(one("User"), "amends");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    // The store: the state directory, writable, and the data dir serve uses.
    let state = format!("/var/lib/{}", one("StateDirectory"));
    assert_eq!(one("ReadWritePaths"), state);
    assert!(
        service["Environment"].contains(&format!("AMENDS_DATA_DIR={state}")),
        "{:?}",
        service["Environment"]
    );
    assert!(one("LimitNOFILE").parse::<u32>().unwrap() >= 4096);
    assert_eq!(sections["Install"]["WantedBy"], ["multi-user.target"]);
}

/// The lines `systemd-analyze verify` printed about the unit.
fn verify(unit: &Path) -> Option<Vec<String>> {
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let name = unit.file_name().unwrap().to_str().unwrap();
    let mut complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains(name))
        .map(String::from)
        .collect();
    if !out.status.success() && complaints.is_empty() {
        complaints.push(format!(
            "exit {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Some(complaints)
}

/// The unit as it would be installed, with ExecStart pointing at the built
/// binary (verify checks that the command exists).
fn installed_unit(text: &str, dir: &Path) -> PathBuf {
    let binary = env!("CARGO_BIN_EXE_amends");
    let path = dir.join("amends.service");
    std::fs::write(&path, text.replace("/usr/local/bin/amends", binary)).unwrap();
    path
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let text = read(UNIT);
    let Some(complaints) = verify(&installed_unit(&text, dir.path())) else {
        eprintln!(
            "systemd-analyze not found: {UNIT} checked by its keys only \
             (systemd_unit_restarts_serve_and_keeps_its_state)"
        );
        return;
    };
    assert_eq!(complaints, Vec::<String>::new(), "systemd-analyze verify");
    // And it would notice a mistake.
    let broken = text.replace("ProtectSystem=strict", "ProtectSystm=strict");
    let complaints = verify(&installed_unit(&broken, dir.path())).unwrap();
    assert!(
        complaints.iter().any(|c| c.contains("ProtectSystm")),
        "{complaints:?}"
    );
}
