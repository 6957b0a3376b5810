//! The module layering of README "Layout", enforced: every `crate::` path in `src/` names a
//! module of a lower layer than the module it stands in (or its own), so there are no circles and
//! no import points up. The Matrix rules stay free of `http`, `hyper` and Redis, and no module
//! shadows a dependency's name.

use std::path::Path;

/// Bottom up. A module may use modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["body", "matrix", "session"],
    &["config"],
    &["tls", "telemetry", "ratelimit"],
    &["store", "upstream"],
    &["app"],
    &["server", "lifecycle"],
    &["admin"],
    &["lib"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn sources(dir: &Path, top: Option<&str>, out: &mut Vec<(String, String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            sources(&path, Some(top.unwrap_or(&name)), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = top.unwrap_or(&name).to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((path.display().to_string(), module, text));
        }
    }
}

/// Code lines only: comments (doc links included) are not imports.
fn code(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
}

/// The top-level modules a line names with `crate::` (`use crate::{a, b}` counts both).
fn used(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let m: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push(m);
            }
        } else {
            found.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found.retain(|m| !m.is_empty() && m.chars().next().is_some_and(|c| c.is_lowercase()));
    found
}

fn all_sources() -> Vec<(String, String, String)> {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        None,
        &mut files,
    );
    // main.rs is its own crate (it uses `matrix_refresh_proxy::`, not `crate::`).
    files.retain(|(_, m, _)| m != "main");
    files
}

#[test]
fn no_import_points_up() {
    let mut wrong = Vec::new();
    for (path, module, text) in all_sources() {
        let Some(own) = layer(&module) else {
            wrong.push(format!(
                "{path}: module `{module}` is in no layer of tests/layers.rs"
            ));
            continue;
        };
        for (n, line) in code(&text) {
            for m in used(line) {
                match layer(&m) {
                    _ if m == module => {}
                    Some(l) if l < own => {}
                    Some(_) => wrong.push(format!(
                        "{path}:{}: `{module}` (layer {own}) uses `{m}`: {}",
                        n + 1,
                        line.trim()
                    )),
                    None => wrong.push(format!("{path}:{}: `{m}` is in no layer", n + 1)),
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layer order:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn matrix_rules_know_no_http_hyper_or_redis() {
    for (path, module, text) in all_sources() {
        if module != "matrix" {
            continue;
        }
        for (n, line) in code(&text) {
            for crate_name in ["http::", "hyper", "redis", "tokio"] {
                let hit = line.match_indices(crate_name).any(|(i, _)| {
                    i == 0
                        || !line.as_bytes()[i - 1].is_ascii_alphanumeric()
                            && line.as_bytes()[i - 1] != b'_'
                });
                assert!(
                    !hit,
                    "{path}:{}: {crate_name} in the Matrix rules: {}",
                    n + 1,
                    line.trim()
                );
            }
        }
    }
}

#[test]
fn no_module_shadows_a_dependency() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let deps: Vec<String> = manifest
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().replace('-', "_")))
        .filter(|k| !k.is_empty() && !k.contains(' ') && !k.starts_with('#') && !k.starts_with('['))
        .collect();
    for layer in LAYERS {
        for m in *layer {
            assert!(
                !deps.iter().any(|d| d == m),
                "module `{m}` shadows the crate `{m}`"
            );
        }
    }
}

#[test]
fn the_checker_sees_imports() {
    assert_eq!(used("use crate::config::Config;"), ["config"]);
    assert_eq!(used("use crate::{body, tls::x};"), ["body", "tls"]);
    assert_eq!(
        used("    let s = crate::store::x(crate::app::App);"),
        ["store", "app"]
    );
    assert_eq!(layer("server"), Some(5));
}
