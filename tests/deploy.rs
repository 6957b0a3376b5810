//! The deployment files agree with the binary: every plain YAML file under `deploy/kubernetes`
//! parses, the configurations that `deploy/` embeds pass the proxy's own parser, and ports,
//! probes, secrets and timeouts line up between the files that must agree.
//!
//! Helm templates are not plain YAML and are not rendered here: `values.yaml` is parsed, the
//! "none" → null rule of `_helpers.tpl` is applied to it as the chart does, and the probe ports
//! of the Deployment template are checked as text.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use matrix_refresh_proxy::config::{Config, ENV_OVERRIDES};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// Config keys that accept null, which Helm cannot pass through values: the chart writes them
/// as "none" (templates/_helpers.tpl, "mrp.config").
const HELM_NULLABLE: &[(&str, &str)] = &[
    ("admin", "listen"),
    ("rate_limit", "all"),
    ("rate_limit", "login"),
    ("rate_limit", "refresh"),
    ("tokens", "refresh_token_lifetime"),
    ("tokens", "session_lifetime"),
];

/// Readiness checks Redis and the homeserver with 2 s each (README, "Operations"): a probe must
/// wait longer than that for the answer.
const MIN_READINESS_TIMEOUT_SECS: u64 = 3;

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a (multi-document) YAML file, empty ones left out.
fn documents(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn get<'a>(v: &'a Value, dotted: &str) -> &'a Value {
    dotted.split('.').fold(v, |v, k| match v {
        Value::Sequence(s) => &s[k.parse::<usize>().unwrap()],
        _ => &v[k],
    })
}

fn str_at<'a>(v: &'a Value, dotted: &str) -> &'a str {
    get(v, dotted)
        .as_str()
        .unwrap_or_else(|| panic!("{dotted} is not a string: {:?}", get(v, dotted)))
}

/// Parses a config text with the proxy's own parser, strictly (unknown keys are errors).
fn parse_config(text: &str, env: impl Fn(&str) -> Option<String>, what: &str) -> Config {
    Config::parse(text, env).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `shutdown_timeout` must be written out in a deployment's config, not left to the default:
/// the kill timeouts next to it are sized for it.
fn explicit_shutdown_timeout(text: &str, config: &Config, what: &str) -> Duration {
    let doc: Value = serde_yaml::from_str(text).unwrap();
    let written = doc["shutdown_timeout"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: shutdown_timeout is not set explicitly"));
    assert_eq!(
        humantime::parse_duration(written).unwrap(),
        config.shutdown_timeout,
        "{what}"
    );
    config.shutdown_timeout
}

fn kube_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(path("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml") || n.ends_with(".yaml.example"))
        .map(|n| format!("deploy/kubernetes/{n}"))
        .collect();
    files.sort();
    files
}

/// Every Kubernetes object of deploy/kubernetes, the Secret example included.
fn kube_objects() -> Vec<Value> {
    kube_files().iter().flat_map(|f| documents(f)).collect()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

#[test]
fn kubernetes_files_are_objects_with_kind_and_name() {
    let files = kube_files();
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        let docs = documents(f);
        assert!(!docs.is_empty(), "{f}: no document");
        for d in &docs {
            for key in ["apiVersion", "kind", "metadata.name"] {
                assert!(
                    get(d, key).as_str().is_some_and(|s| !s.is_empty()),
                    "{f}: {key}"
                );
            }
        }
    }
}

/// The ConfigMap's config.yaml, parsed as the sidecar sees it: with the Redis URL the
/// Deployment passes from the Secret as MRP_REDIS_URL. Returns the config and its text.
fn kube_proxy_config(objects: &[Value]) -> (Config, String) {
    let cm = object(objects, "ConfigMap", "matrix-refresh-proxy");
    let text = cm["data"]["config.yaml"]
        .as_str()
        .expect("data: config.yaml")
        .to_owned();
    let proxy = sidecar(objects);
    let env_ref = proxy["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MRP_REDIS_URL")
        .expect("MRP_REDIS_URL in the sidecar's env");
    let secret = object(
        objects,
        "Secret",
        str_at(env_ref, "valueFrom.secretKeyRef.name"),
    );
    let url = str_at(
        &secret["stringData"],
        str_at(env_ref, "valueFrom.secretKeyRef.key"),
    )
    .to_owned();
    let config = parse_config(
        &text,
        |k| (k == "MRP_REDIS_URL").then(|| url.clone()),
        "deploy/kubernetes/configmap.yaml",
    );
    assert_eq!(config.redis.url, url);
    (config, text)
}

fn pod_spec(objects: &[Value]) -> &Value {
    get(
        object(objects, "Deployment", "conduit"),
        "spec.template.spec",
    )
}

fn sidecar(objects: &[Value]) -> &Value {
    &pod_spec(objects)["initContainers"][0]
}

/// The `containerPort` of the port named `name` (probes and Services refer to it by name).
fn container_port(container: &Value, name: &str) -> u16 {
    let port = container["ports"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{}: no ports", container["name"].as_str().unwrap()))
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
        .as_u64()
        .unwrap();
    u16::try_from(port).unwrap()
}

#[test]
fn kubernetes_configmap_config_passes_the_parser_and_matches_the_pod() {
    let objects = kube_objects();
    let (config, _) = kube_proxy_config(&objects);
    let pod = pod_spec(&objects);
    let proxy = sidecar(&objects);
    let conduit = &pod["containers"][0];

    // Clients reach the proxy on the container port the Service targets, on the pod IP.
    assert!(config.listen.ip().is_unspecified(), "{}", config.listen);
    assert_eq!(config.listen.port(), container_port(proxy, "client"));

    // The upstream is Conduit on the pod's loopback, on the port Conduit is told to use.
    let conduit_env = |name: &str| {
        conduit["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| str_at(e, "value").to_owned())
            .unwrap_or_else(|| panic!("Conduit env {name}"))
    };
    assert_eq!(conduit_env("CONDUIT_ADDRESS"), "127.0.0.1");
    assert_eq!(
        config.upstream.url.to_string().trim_end_matches('/'),
        format!("http://127.0.0.1:{}", conduit_env("CONDUIT_PORT"))
    );

    // The admin listener: on the pod IP (the kubelet probes it there), on the port named
    // `admin` that the probes use, never the client port.
    let admin = config.admin.listen.expect("admin.listen must be set");
    assert!(admin.ip().is_unspecified(), "admin.listen {admin}");
    assert_eq!(admin.port(), container_port(proxy, "admin"));
    assert_ne!(admin.port(), config.listen.port());
}

#[test]
fn kubernetes_sidecar_shape() {
    let objects = kube_objects();
    let (config, text) = kube_proxy_config(&objects);
    let deploy = object(&objects, "Deployment", "conduit");
    let pod = pod_spec(&objects);
    let proxy = sidecar(&objects);
    assert_eq!(proxy["name"], "matrix-refresh-proxy");
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");

    // Both probes are HTTP on the admin listener, at its real paths.
    let admin = config.admin.listen.expect("admin.listen must be set");
    for (probe, path) in [
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
    ] {
        assert_eq!(str_at(proxy, &format!("{probe}.httpGet.path")), path);
        let port = str_at(proxy, &format!("{probe}.httpGet.port"));
        assert_eq!(port, "admin", "{probe}");
        assert_eq!(container_port(proxy, port), admin.port(), "{probe}");
    }
    let timeout = get(proxy, "readinessProbe.timeoutSeconds")
        .as_u64()
        .unwrap();
    assert!(
        timeout >= MIN_READINESS_TIMEOUT_SECS,
        "readinessProbe.timeoutSeconds {timeout}"
    );

    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(
        sc["capabilities"]["drop"]
            .as_sequence()
            .unwrap()
            .contains(&"ALL".into())
    );
    assert!(get(proxy, "resources.requests").is_mapping());
    assert!(get(proxy, "resources.limits.memory").is_string());

    // Termination: the main containers (preStop sleep, then SIGTERM) go first, then the
    // sidecar drains for up to shutdown_timeout. All of it must fit in the grace period.
    let drain = explicit_shutdown_timeout(&text, &config, "deploy/kubernetes/configmap.yaml");
    let pre_stop: u64 = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| pod[*list].as_sequence().unwrap())
        .filter_map(|c| get(c, "lifecycle.preStop.sleep.seconds").as_u64())
        .sum();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        Duration::from_secs(grace) > drain + Duration::from_secs(pre_stop),
        "terminationGracePeriodSeconds {grace} must exceed shutdown_timeout {drain:?} + preStop {pre_stop}s"
    );

    // The config volume is the ConfigMap, mounted where --config points (a directory mount,
    // not subPath, so that ConfigMap updates reach the file for SIGHUP reloads).
    let args: Vec<&str> = proxy["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["--config", "/etc/matrix-refresh-proxy/config.yaml"]);
    let mount = &proxy["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/matrix-refresh-proxy");
    assert!(mount["subPath"].is_null());
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    object(&objects, "ConfigMap", str_at(volume, "configMap.name"));
    for v in pod["volumes"].as_sequence().unwrap() {
        if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            object(&objects, "PersistentVolumeClaim", claim);
        }
    }

    // The Service selects this pod and exposes the proxy's client port only (never /metrics).
    let service = object(&objects, "Service", "matrix");
    let labels = get(deploy, "spec.template.metadata.labels")
        .as_mapping()
        .unwrap();
    for (k, v) in get(service, "spec.selector").as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v), "selector {k:?}");
    }
    let ports = get(service, "spec.ports").as_sequence().unwrap();
    assert_eq!(ports.len(), 1, "only the proxy's port");
    assert_eq!(ports[0]["targetPort"], "client");
}

/// `Key=Value` lines of a unit file (comments and sections left out), in order.
fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn systemd_unit_notifies_checks_the_config_first_and_outlasts_the_drain() {
    let unit = read("deploy/systemd/matrix-refresh-proxy.service");
    let entries = unit_entries(&unit);
    let all = |key: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let one = |key: &str| {
        let v = all(key);
        assert_eq!(v.len(), 1, "{key}: {v:?}");
        v[0].clone()
    };
    let start = one("ExecStart");
    let pre = one("ExecStartPre");
    assert!(pre.contains(" check-config"), "{pre}");
    // The check reads the file the service runs with.
    let config_arg = |cmd: &str| cmd.split_once("--config ").unwrap().1.to_owned();
    let binary = |cmd: &str| cmd.split_whitespace().next().unwrap().to_owned();
    assert_eq!(config_arg(&pre), config_arg(&start));
    assert_eq!(binary(&pre), binary(&start));

    // sd-notify: READY=1 once listening with Redis answering, watchdog pings at half of
    // WatchdogSec (the binary pings only when WATCHDOG_USEC is set, i.e. with WatchdogSec=).
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    let watchdog = humantime::parse_duration(&one("WatchdogSec")).unwrap();
    assert!(
        watchdog >= Duration::from_secs(2),
        "WatchdogSec {watchdog:?}"
    );

    // `systemctl reload`: check the file (same binary, same file), then SIGHUP the main process.
    let reload = all("ExecReload");
    assert_eq!(
        reload.last().unwrap(),
        "/bin/kill -HUP $MAINPID",
        "{reload:?}"
    );
    let check = &reload[0];
    assert!(check.contains(" check-config"), "{reload:?}");
    assert_eq!(config_arg(check), config_arg(&start));
    assert_eq!(binary(check), binary(&start));

    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("EnvironmentFile"), "-/etc/default/matrix-refresh-proxy");

    // The unit runs the repository's config.yaml (its install instructions copy it to the
    // --config path): systemd must wait longer than that file's drain before SIGKILL.
    // (The install steps live in deploy/systemd/README.md, and in the README's quick start.)
    let install = read("deploy/systemd/README.md");
    assert!(
        install.contains(&format!(
            "install -Dm644 config.yaml {}",
            config_arg(&start)
        )),
        "the unit's install instructions no longer copy config.yaml to {}",
        config_arg(&start)
    );
    let text = read("config.yaml");
    let config = parse_config(&text, |_| None, "config.yaml");
    let drain = explicit_shutdown_timeout(&text, &config, "config.yaml");
    let stop = humantime::parse_duration(&one("TimeoutStopSec")).unwrap();
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} must exceed shutdown_timeout {drain:?}"
    );

    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("DynamicUser", "yes"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert!(
        entries
            .iter()
            .any(|(k, v)| k == "SystemCallFilter" && v == "@system-service")
    );
}

#[test]
fn systemd_environment_file_names_only_real_overrides() {
    let text = read("deploy/systemd/matrix-refresh-proxy.default");
    // Commented examples count: they are what an operator uncomments.
    let vars: Vec<(String, String)> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            (!k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .then(|| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let known: BTreeSet<&str> = ENV_OVERRIDES
        .iter()
        .map(|(v, _)| *v)
        .chain(["RUST_LOG"])
        .collect();
    let named: BTreeSet<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    assert!(named.is_subset(&known), "{named:?} vs {known:?}");
    for (var, _) in ENV_OVERRIDES {
        assert!(named.contains(var), "{var} is not documented");
    }
    // With every example set, the shipped config.yaml still passes.
    let env = |k: &str| {
        vars.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    };
    let c = parse_config(&read("config.yaml"), env, "config.yaml + .default");
    assert_eq!(c.upstream.url.to_string(), "http://127.0.0.1:6167/");
}

/// The numbers after each `--stop-timeout ` in `text`.
fn stop_timeouts(text: &str) -> Vec<u64> {
    text.split("--stop-timeout ")
        .skip(1)
        .map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits
                .parse()
                .unwrap_or_else(|_| panic!("--stop-timeout {rest:.20}"))
        })
        .collect()
}

#[test]
fn docker_image_config_needs_only_the_upstream() {
    let text = read("deploy/docker/config.yaml");
    let err = Config::parse(&text, |_| None).unwrap_err().to_string();
    assert!(err.contains("upstream.url"), "{err}");
    let c = parse_config(
        &text,
        |k| (k == "MRP_UPSTREAM_URL").then(|| "http://conduit:6167".to_owned()),
        "deploy/docker/config.yaml",
    );
    assert!(c.listen.ip().is_unspecified());
    // The admin listener is reachable from outside the container, on an EXPOSEd port.
    let admin = c.admin.listen.expect("admin.listen");
    assert!(admin.ip().is_unspecified(), "admin.listen {admin}");

    let dockerfile = read("Dockerfile");
    let expose: Vec<&str> = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap()
        .split_whitespace()
        .collect();
    for port in [c.listen.port(), admin.port()] {
        assert!(
            expose.contains(&port.to_string().as_str()),
            "EXPOSE {expose:?} lacks {port}"
        );
    }

    // Docker's default stop timeout (10 s) is below the drain: every `docker run` example
    // raises it above shutdown_timeout.
    let drain = explicit_shutdown_timeout(&text, &c, "deploy/docker/config.yaml");
    let stops: Vec<u64> = stop_timeouts(&dockerfile)
        .into_iter()
        .chain(stop_timeouts(&text))
        .collect();
    assert!(
        !stops.is_empty(),
        "no --stop-timeout in the docker examples"
    );
    for stop in stops {
        assert!(
            Duration::from_secs(stop) > drain,
            "--stop-timeout {stop} must exceed shutdown_timeout {drain:?}"
        );
    }
    assert!(dockerfile.lines().any(|l| l == "STOPSIGNAL SIGTERM"));

    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(
        dockerfile.contains("COPY deploy/docker/config.yaml /etc/matrix-refresh-proxy/config.yaml")
    );
    assert!(dockerfile.contains(r#"ENTRYPOINT ["matrix-refresh-proxy"]"#));
    assert!(dockerfile.contains(r#"CMD ["--config", "/etc/matrix-refresh-proxy/config.yaml"]"#));
    let ignore = read(".dockerignore");
    for p in ["target/", "fuzz/target/", "tests/e2e/js/node_modules/"] {
        assert!(ignore.lines().any(|l| l == p), "{p}");
    }
}

/// Every key path of a config mapping (`tokens.session_lifetime` …), sections included.
fn key_paths(prefix: &str, m: &Mapping, out: &mut BTreeSet<String>) {
    for (k, v) in m {
        let key = format!("{prefix}{}", k.as_str().unwrap());
        if let Value::Mapping(inner) = v {
            key_paths(&format!("{key}."), inner, out);
        }
        out.insert(key);
    }
}

/// The `(section, key)` pairs that `$nullable` in templates/_helpers.tpl turns from "none" into
/// null: `dict "tokens" (list "a" "b") "admin" (list "listen") …`.
fn helm_nullable_keys() -> BTreeSet<(String, String)> {
    let helpers = read("deploy/helm/matrix-refresh-proxy/templates/_helpers.tpl");
    let line = helpers
        .lines()
        .find_map(|l| l.split_once("$nullable := dict ").map(|(_, rest)| rest))
        .expect("$nullable in _helpers.tpl");
    let mut out = BTreeSet::new();
    let mut section = String::new();
    let mut in_list = false;
    for (i, part) in line.split('"').enumerate() {
        if i % 2 == 0 {
            // Between quoted strings: track the parentheses of `(list …)`.
            if part.contains('(') {
                in_list = true;
            }
            if part.contains(')') {
                in_list = false;
            }
        } else if in_list {
            out.insert((section.clone(), part.to_owned()));
        } else {
            section = part.to_owned();
        }
    }
    out
}

/// What templates/_helpers.tpl ("mrp.config") does to `.Values.config` before rendering it.
fn helm_render_config(mut config: Value) -> String {
    for (section, key) in helm_nullable_keys() {
        if config[section.as_str()][key.as_str()] == "none" {
            config[section.as_str()][key.as_str()] = Value::Null;
        }
    }
    serde_yaml::to_string(&config).unwrap()
}

#[test]
fn helm_values_map_every_config_key_and_pass_the_parser() {
    let values: Value =
        serde_yaml::from_str(&read("deploy/helm/matrix-refresh-proxy/values.yaml")).unwrap();
    let mut config = values["config"].clone();

    // Every key of the documented config.yaml is spelled out in values (redis.url through the
    // redis: section, as a Secret), so the chart renders each one as given.
    let shipped: Value = serde_yaml::from_str(&read("config.yaml")).unwrap();
    let (mut want, mut have) = (BTreeSet::new(), BTreeSet::new());
    key_paths("", shipped.as_mapping().unwrap(), &mut want);
    key_paths("", config.as_mapping().unwrap(), &mut have);
    want.remove("redis.url");
    let missing: Vec<_> = want.difference(&have).collect();
    assert!(missing.is_empty(), "values.yaml config lacks {missing:?}");
    assert!(values["redis"]["url"].is_string() && values["redis"]["existingSecret"].is_string());

    // The "none" rule covers the listed keys, and each of them really accepts null.
    let expected: BTreeSet<(String, String)> = HELM_NULLABLE
        .iter()
        .map(|(s, k)| (s.to_string(), k.to_string()))
        .collect();
    assert_eq!(helm_nullable_keys(), expected, "$nullable in _helpers.tpl");
    for (section, key) in HELM_NULLABLE {
        let text = format!("upstream: {{url: 'http://hs'}}\n{section}: {{{key}: null}}");
        parse_config(&text, |_| None, &text);
    }

    // The required upstream.url is set by the user; the rest renders as given.
    config["upstream"]["url"] = "http://conduit:6167".into();
    let text = helm_render_config(config.clone());
    let c = parse_config(&text, |_| None, "helm values.yaml config");
    assert_eq!(c.tokens.session, None);
    assert!(c.listen.ip().is_unspecified());
    let admin = c.admin.listen.expect("config.admin.listen");
    assert!(admin.ip().is_unspecified(), "admin.listen {admin}");
    assert_ne!(admin.port(), c.listen.port());

    // Termination: preStop sleep, then the drain, inside the grace period.
    let drain = explicit_shutdown_timeout(&text, &c, "helm values.yaml config");
    let grace = values["terminationGracePeriodSeconds"].as_u64().unwrap();
    let pre_stop = values["preStopSleepSeconds"].as_u64().unwrap();
    assert!(
        Duration::from_secs(grace) > drain + Duration::from_secs(pre_stop),
        "terminationGracePeriodSeconds {grace} must exceed shutdown_timeout {drain:?} + preStopSleepSeconds {pre_stop}"
    );
    let timeout = values["readinessProbe"]["timeoutSeconds"].as_u64().unwrap();
    assert!(
        timeout >= MIN_READINESS_TIMEOUT_SECS,
        "readinessProbe.timeoutSeconds {timeout}"
    );

    // "none" turns the admin listener and single limits off.
    config["admin"]["listen"] = "none".into();
    config["rate_limit"]["login"] = "none".into();
    let c = parse_config(&helm_render_config(config), |_| None, "values with none");
    assert_eq!(c.admin.listen, None);
    assert_eq!(c.rate_limit.login, None);
}

#[test]
fn helm_probes_use_the_admin_port() {
    // Templates are not YAML; check the text of the admin branch of the probes in the
    // container template (_helpers.tpl, "mrp.container") that both modes include.
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let helpers = read("deploy/helm/matrix-refresh-proxy/templates/_helpers.tpl");
    let template = squeeze(
        helpers
            .split_once(r#"{{- define "mrp.container" -}}"#)
            .expect("mrp.container in _helpers.tpl")
            .1
            .split_once(r#"{{- define "#)
            .unwrap()
            .0,
    );
    let branch = template
        .split_once(r#"{{- if include "mrp.adminEnabled" . }} readinessProbe:"#)
        .expect("probes under mrp.adminEnabled")
        .1
        .split_once("{{- else }}")
        .unwrap()
        .0;
    for path in ["/health/ready", "/health/live"] {
        assert!(
            branch.contains(&format!("httpGet: path: {path} port: admin")),
            "{path} not probed on port admin: {branch}"
        );
    }
    assert!(template.contains(r#"- name: admin containerPort: {{ include "mrp.adminPort" . }}"#));
    assert!(
        squeeze(&helpers).contains(
            r#"{{- define "mrp.adminPort" -}} {{- include "mrp.port" .Values.config.admin.listen }}"#
        ),
        "the admin containerPort comes from config.admin.listen"
    );
    // Sidecar mode: the same container, as a native sidecar.
    assert!(
        template.contains(r#"{{- if eq .Values.mode "sidecar" }}"#)
            && template.contains("restartPolicy: Always"),
        "mrp.container: restartPolicy Always in sidecar mode"
    );
    // Both modes include the container and the drain-vs-grace check.
    for file in ["deployment.yaml", "sidecar.yaml"] {
        let t = read(&format!(
            "deploy/helm/matrix-refresh-proxy/templates/{file}"
        ));
        assert!(t.contains(r#"include "mrp.container" ."#), "{file}");
        assert!(t.contains(r#"include "mrp.checkGrace" ."#), "{file}");
    }
}

/// Every key path of a JSON schema's object `properties`, with `additionalProperties: false`
/// at every object level (typos must be rejected, as the proxy's deny_unknown_fields does).
fn schema_key_paths(prefix: &str, schema: &serde_json::Value, out: &mut BTreeSet<String>) {
    let Some(props) = schema["properties"].as_object() else {
        // A limit: { per_second, burst } or "none"/null.
        if let Some(alts) = schema["oneOf"].as_array() {
            for a in alts {
                schema_key_paths(prefix, a, out);
            }
        }
        return;
    };
    assert_eq!(
        schema["additionalProperties"],
        serde_json::Value::Bool(false),
        "values.schema.json: {prefix} accepts unknown keys"
    );
    for (k, v) in props {
        let p = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        out.insert(p.clone());
        schema_key_paths(&p, v, out);
    }
}

#[test]
fn helm_schema_knows_exactly_the_config_keys() {
    let schema: serde_json::Value =
        serde_json::from_str(&read("deploy/helm/matrix-refresh-proxy/values.schema.json")).unwrap();
    assert_eq!(
        schema["additionalProperties"],
        serde_json::Value::Bool(false)
    );
    let mut in_schema = BTreeSet::new();
    schema_key_paths("", &schema["properties"]["config"], &mut in_schema);
    // The shipped config.yaml spells out every key (another test checks that).
    let shipped: Value = serde_yaml::from_str(&read("config.yaml")).unwrap();
    let mut in_config = BTreeSet::new();
    key_paths("", shipped.as_mapping().unwrap(), &mut in_config);
    // Null in config.yaml, tables when set.
    for k in [
        "tls.cert_file",
        "tls.key_file",
        "rate_limit.all.per_second",
        "rate_limit.all.burst",
        "redis.sentinel.master_name",
        "redis.sentinel.nodes",
        "redis.sentinel.password_file",
        "redis.cluster.nodes",
        "redis.cluster.password_file",
    ] {
        in_config.insert(k.to_owned());
    }
    assert_eq!(
        in_schema, in_config,
        "values.schema.json vs config.yaml keys"
    );
    // Every top-level key of values.yaml is in the schema.
    let values: Value =
        serde_yaml::from_str(&read("deploy/helm/matrix-refresh-proxy/values.yaml")).unwrap();
    for (k, _) in values.as_mapping().unwrap() {
        let k = k.as_str().unwrap();
        assert!(
            schema["properties"][k].is_object(),
            "values.yaml key {k} not in values.schema.json"
        );
    }
}

#[test]
fn helm_ci_value_sets_pass_the_parser() {
    let dir = path("deploy/helm/matrix-refresh-proxy/ci");
    let values: Value =
        serde_yaml::from_str(&read("deploy/helm/matrix-refresh-proxy/values.yaml")).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let set: Value = serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        // Helm's merge of the set over values.yaml (maps merge, anything else replaces).
        fn merge(base: &mut Value, over: &Value) {
            match (base, over) {
                (Value::Mapping(b), Value::Mapping(o)) => {
                    for (k, v) in o {
                        match b.get_mut(k) {
                            Some(bv) if bv.is_mapping() && v.is_mapping() => merge(bv, v),
                            _ => {
                                b.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
                (b, o) => *b = o.clone(),
            }
        }
        let mut merged = values.clone();
        merge(&mut merged, &set);
        let text = helm_render_config(merged["config"].clone());
        let what = p.display().to_string();
        let tls = text.contains("cert_file");
        // Sentinel and Cluster sets take no URL: the chart then sets no MRP_REDIS_URL.
        let ha = !merged["config"]["redis"]["sentinel"].is_null()
            || !merged["config"]["redis"]["cluster"].is_null();
        let c = Config::parse(&text, |k| {
            (k == "MRP_REDIS_URL" && !ha).then(|| "redis://127.0.0.1:1".to_owned())
        });
        match c {
            Ok(_) => {}
            // The TLS files are the operator's mounts; scripts/deploy-check.sh parses that set
            // with stand-in files.
            Err(e) if tls && e.to_string().contains("cannot read") => {}
            Err(e) => panic!("{what}: {e}"),
        }
        n += 1;
    }
    assert!(n >= 6, "{n} value sets");
}

#[test]
fn kubernetes_homeserver_container_is_restricted_compatible() {
    let objects = kube_objects();
    let pod = pod_spec(&objects);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let containers = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_sequence().unwrap());
    for c in containers {
        let name = c["name"].as_str().unwrap();
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}: runAsNonRoot");
        assert!(
            sc["runAsUser"].as_u64().is_some_and(|u| u > 0),
            "{name}: numeric non-root uid"
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{name}");
    }
}

#[test]
fn kubernetes_readme_says_edit_first_before_apply() {
    let readme = read("deploy/kubernetes/README.md");
    let edit = readme.find("Edit first").expect("an 'Edit first' section");
    let apply = readme
        .find("kubectl apply -f deploy/kubernetes/\n")
        .expect("the apply command");
    assert!(
        edit < apply,
        "'Edit first' must come before the apply commands"
    );
    assert!(readme[edit..apply].contains("CONDUIT_SERVER_NAME"));
}

/// The Kubernetes example wires the operator API's Secret: the config's `admin.token_file` and
/// `admin.upstream_key_file` are files of a Secret volume that only the proxy mounts, read-only,
/// and the Secret example has those keys (empty: the proxy refuses to start on them).
#[test]
fn kubernetes_admin_secret_is_mounted_read_only_where_the_config_points() {
    let objects = kube_objects();
    let (config, _) = kube_proxy_config(&objects);
    let proxy = sidecar(&objects);
    let pod = pod_spec(&objects);
    let files = [
        config.admin.token_file.clone().expect("admin.token_file"),
        config
            .admin
            .upstream_key_file
            .clone()
            .expect("admin.upstream_key_file"),
    ];
    for file in &files {
        let dir = file.parent().unwrap().to_str().unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        let mount = proxy["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
        assert_eq!(mount["readOnly"], true, "{dir}");
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let secret = &volume["secret"];
        let item = secret["items"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|i| i["path"] == name)
            .unwrap_or_else(|| panic!("no Secret item for {name}"));
        let example = object(&objects, "Secret", str_at(secret, "secretName"));
        assert!(
            example["stringData"][str_at(item, "key")].is_string(),
            "{name}: key missing in the Secret example"
        );
        // Only the proxy mounts it.
        for c in pod["containers"].as_sequence().unwrap() {
            let mounts = c["volumeMounts"].as_sequence().cloned().unwrap_or_default();
            assert!(mounts.iter().all(|m| m["name"] != mount["name"]));
        }
    }
}
