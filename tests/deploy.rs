//! The deployment files agree with the binary: every plain YAML file under `deploy/kubernetes`
//! parses, the configurations that `deploy/` embeds pass the proxy's own parser, and ports,
//! probes, secrets and timeouts line up between the files that must agree.
//!
//! Helm templates are not plain YAML and are not parsed here; `values.yaml` is.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use matrix_refresh_proxy::config::{Config, ENV_OVERRIDES};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// Top-level config keys of features on branches not merged yet (admin listener, rate limits,
/// graceful-shutdown timeout). The deployment files already carry them. While the parser
/// rejects one as an unknown field it is removed and the rest parsed again, so every other key
/// is still checked; once its branch lands the parser accepts it and it is checked too.
const UPCOMING: &[&str] = &["admin", "rate_limit", "trusted_proxies", "shutdown_timeout"];

/// The drain after SIGTERM (`DRAIN_TIMEOUT` in lib.rs; UPCOMING: `shutdown_timeout`).
const DRAIN: Duration = Duration::from_secs(30);

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

/// Parses a config text, removing upcoming keys only while the parser rejects them as unknown.
fn parse_config(text: &str, env: impl Fn(&str) -> Option<String>, what: &str) -> Config {
    let mut doc: Value = serde_yaml::from_str(text).unwrap();
    let mut removed = Vec::new();
    loop {
        let text = serde_yaml::to_string(&doc).unwrap();
        match Config::parse(&text, &env) {
            Ok(c) => return c,
            Err(e) => {
                let msg = e.to_string();
                let key = UPCOMING
                    .iter()
                    .find(|k| msg.contains(&format!("unknown field `{k}`")))
                    .unwrap_or_else(|| {
                        panic!("{what}: {msg} (upcoming keys removed: {removed:?})")
                    });
                doc.as_mapping_mut().unwrap().remove(*key);
                removed.push(*key);
            }
        }
    }
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
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

#[test]
fn kubernetes_configmap_config_passes_the_parser_and_matches_the_pod() {
    let objects = kube_objects();
    let cm = object(&objects, "ConfigMap", "matrix-refresh-proxy");
    let text = cm["data"]["config.yaml"]
        .as_str()
        .expect("data: config.yaml");
    let deploy = object(&objects, "Deployment", "conduit");
    let pod = get(deploy, "spec.template.spec");
    let proxy = &pod["initContainers"][0];
    let conduit = &pod["containers"][0];

    // The Redis URL comes from the Secret, as the Deployment passes it.
    let env_ref = proxy["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MRP_REDIS_URL")
        .expect("MRP_REDIS_URL in the sidecar's env");
    let secret = object(
        &objects,
        "Secret",
        str_at(env_ref, "valueFrom.secretKeyRef.name"),
    );
    let url = str_at(
        &secret["stringData"],
        str_at(env_ref, "valueFrom.secretKeyRef.key"),
    )
    .to_owned();
    let config = parse_config(
        text,
        |k| (k == "MRP_REDIS_URL").then(|| url.clone()),
        "deploy/kubernetes/configmap.yaml",
    );
    assert_eq!(config.redis.url, url);

    // Clients reach the proxy on the container port the Service targets, on the pod IP.
    assert!(config.listen.ip().is_unspecified(), "{}", config.listen);
    let container_port = |c: &Value, name: &str| {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        u64::from(config.listen.port()),
        container_port(proxy, "client")
    );

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

    // UPCOMING admin listener: on the pod IP, on the port the probes use.
    let doc: Value = serde_yaml::from_str(text).unwrap();
    let admin = str_at(&doc, "admin.listen");
    assert!(admin.starts_with("0.0.0.0:"), "{admin}");
    assert_eq!(port_of(admin), container_port(proxy, "admin"));
}

#[test]
fn kubernetes_sidecar_shape() {
    let objects = kube_objects();
    let deploy = object(&objects, "Deployment", "conduit");
    let pod = get(deploy, "spec.template.spec");
    let proxy = &pod["initContainers"][0];
    assert_eq!(proxy["name"], "matrix-refresh-proxy");
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");

    for (probe, path) in [
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
    ] {
        assert_eq!(str_at(proxy, &format!("{probe}.httpGet.path")), path);
        assert_eq!(str_at(proxy, &format!("{probe}.httpGet.port")), "admin");
    }

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

    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > DRAIN.as_secs(), "grace {grace}s");

    // The config volume is the ConfigMap, mounted where --config points.
    let args: Vec<&str> = proxy["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["--config", "/etc/matrix-refresh-proxy/config.yaml"]);
    let mount = &proxy["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/matrix-refresh-proxy");
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

    // The Service selects this pod and exposes the proxy's port only.
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
fn systemd_unit_checks_the_config_first_and_outlasts_the_drain() {
    let entries = unit_entries(&read("deploy/systemd/matrix-refresh-proxy.service"));
    let one = |key: &str| {
        let v: Vec<&str> = entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(v.len(), 1, "{key}: {v:?}");
        v[0].to_owned()
    };
    let start = one("ExecStart");
    let pre = one("ExecStartPre");
    assert!(pre.contains(" check-config"), "{pre}");
    // The check reads the file the service runs with.
    let config_arg = |cmd: &str| cmd.split_once("--config ").unwrap().1.to_owned();
    assert_eq!(config_arg(&pre), config_arg(&start));
    assert_eq!(
        pre.split_whitespace().next(),
        start.split_whitespace().next()
    );

    assert_eq!(one("Type"), "exec");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("EnvironmentFile"), "-/etc/default/matrix-refresh-proxy");
    let stop = humantime::parse_duration(&one("TimeoutStopSec")).unwrap();
    assert!(stop > DRAIN, "TimeoutStopSec {stop:?}");

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

    let dockerfile = read("Dockerfile");
    let expose = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap();
    assert!(
        expose
            .split_whitespace()
            .any(|p| p == c.listen.port().to_string()),
        "EXPOSE {expose}"
    );
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

#[test]
fn helm_values_map_every_config_key_and_pass_the_parser() {
    let values: Value =
        serde_yaml::from_str(&read("deploy/helm/matrix-refresh-proxy/values.yaml")).unwrap();
    let mut config = values["config"].clone();

    // Every key of the documented config.yaml is settable through values (redis.url through
    // the redis: section, as a Secret). The upcoming sections are passed through whole, so
    // their presence maps every key inside them.
    let shipped: Value = serde_yaml::from_str(&read("config.yaml")).unwrap();
    let (mut want, mut have) = (BTreeSet::new(), BTreeSet::new());
    key_paths("", shipped.as_mapping().unwrap(), &mut want);
    key_paths("", config.as_mapping().unwrap(), &mut have);
    want.remove("redis.url");
    let passed_through = |k: &String| {
        let top = k.split('.').next().unwrap();
        UPCOMING.contains(&top) && have.contains(top)
    };
    let missing: Vec<_> = want
        .difference(&have)
        .filter(|k| !passed_through(k))
        .collect();
    assert!(missing.is_empty(), "values.yaml config lacks {missing:?}");
    assert!(values["redis"]["url"].is_string() && values["redis"]["existingSecret"].is_string());

    // What templates/_helpers.tpl ("mrp.config") does before rendering: the required
    // upstream.url is set by the user, empty upcoming keys are left out, "none" is null.
    config["upstream"]["url"] = "http://conduit:6167".into();
    let m = config.as_mapping_mut().unwrap();
    for key in UPCOMING {
        let empty = match m.get(*key) {
            None | Some(Value::Null) => true,
            Some(Value::Mapping(x)) => x.is_empty(),
            Some(Value::Sequence(x)) => x.is_empty(),
            Some(Value::String(x)) => x.is_empty(),
            Some(_) => false,
        };
        if empty {
            m.remove(*key);
        }
    }
    for key in ["refresh_token_lifetime", "session_lifetime"] {
        if config["tokens"][key] == "none" {
            config["tokens"][key] = Value::Null;
        }
    }
    let text = serde_yaml::to_string(&config).unwrap();
    let c = parse_config(&text, |_| None, "helm values.yaml config");
    assert_eq!(c.tokens.session, None);
    assert!(c.listen.ip().is_unspecified());
}
