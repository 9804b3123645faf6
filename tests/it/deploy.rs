//! The deployment files against the tool they deploy: every Kubernetes manifest under
//! deploy/kubernetes loads, and every registry-audit command line in it (a container's
//! command and args) goes through the tool's own clap parser, so a renamed flag breaks
//! this test rather than a cluster. Also checked: the image tag is this version, every
//! container asks for resources, mounts only volumes its pod has and expands only
//! variables it defines, check never mounts storage writable, and the shards, their
//! index and the merge agree. README's alert rules are the ones deploy/prometheus holds
//! (promtool checks and unit-tests that file in scripts/test).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;
use serde_json::Value;

use registry_audit::cli::{Cli, Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of every manifest, with the file it came from.
fn manifests() -> Vec<(String, Value)> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).expect("read");
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                v["apiVersion"].is_string() && v["kind"].is_string(),
                "{name}: a document without apiVersion and kind"
            );
            docs.push((name.clone(), v));
        }
    }
    docs
}

/// Every pod spec (an object with `containers`) inside `v`.
fn pod_specs<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            if m.get("containers").is_some_and(Value::is_array) {
                out.push(v);
            }
            m.values().for_each(|x| pod_specs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| pod_specs(x, out)),
        _ => {}
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A registry-audit container: the file, its argv (the image's entrypoint is the
/// binary), the parsed command line, the container and its pod spec.
struct Run<'a> {
    file: String,
    argv: Vec<String>,
    cli: Cli,
    container: &'a Value,
    pod: &'a Value,
}

fn runs(docs: &[(String, Value)]) -> Vec<Run<'_>> {
    let mut out = Vec::new();
    for (file, doc) in docs {
        let mut pods = Vec::new();
        pod_specs(doc, &mut pods);
        for pod in pods {
            let containers = ["initContainers", "containers"]
                .iter()
                .flat_map(|k| pod[*k].as_array().into_iter().flatten());
            for c in containers {
                let image = c["image"].as_str().expect("image");
                if !image.starts_with("registry-audit:") {
                    continue;
                }
                assert_eq!(
                    image,
                    format!("registry-audit:{}", env!("CARGO_PKG_VERSION")),
                    "{file}: the image of this version"
                );
                let mut argv = strings(&c["command"]);
                match argv.first().map(String::as_str) {
                    None => argv.push("registry-audit".into()),
                    Some("/registry-audit" | "registry-audit") => argv[0] = "registry-audit".into(),
                    Some(other) => panic!(
                        "{file}: command {other}: the image has no shell, run /registry-audit"
                    ),
                }
                argv.extend(strings(&c["args"]));
                let cli = Cli::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{file}: {argv:?} does not parse:\n{e}"));
                out.push(Run {
                    file: file.clone(),
                    argv,
                    cli,
                    container: c,
                    pod,
                });
            }
        }
    }
    out
}

#[test]
fn every_command_line_in_the_manifests_parses_and_the_pods_fit_it() {
    let docs = manifests();
    let runs = runs(&docs);
    let commands: Vec<&str> = runs
        .iter()
        .map(|r| match &r.cli.command {
            Command::Check(_) => "check",
            Command::Merge(_) => "merge",
            Command::Gc(_) => "gc",
            _ => "other",
        })
        .collect();
    // The hourly check, the shards, their merge and the GC.
    assert_eq!(commands, ["check", "check", "gc", "merge"], "{commands:?}");
    for r in &runs {
        let (file, c) = (&r.file, r.container);
        let requests = &c["resources"]["requests"];
        assert!(
            requests["cpu"].is_string() && requests["memory"].is_string(),
            "{file}: resource requests"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{file}: a memory limit"
        );
        let volumes: BTreeSet<&str> = r.pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["name"].as_str().expect("volume name"))
            .collect();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().expect("mount name");
            assert!(volumes.contains(name), "{file}: no volume {name}");
            if matches!(r.cli.command, Command::Check(_) | Command::Merge(_))
                && m["mountPath"] == "/var/lib/registry"
            {
                assert_eq!(
                    m["readOnly"], true,
                    "{file}: check mounts storage read-only"
                );
            }
        }
        // Kubernetes expands $(VAR) only for variables the container defines.
        let defined: BTreeSet<&str> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["name"].as_str().expect("env name"))
            .collect();
        for arg in &r.argv {
            for part in arg.split("$(").skip(1) {
                let var = part.split(')').next().unwrap_or("");
                assert!(defined.contains(var), "{file}: $({var}) is not defined");
            }
        }
        // The config the commands name is where the pod mounts it.
        let config = match &r.cli.command {
            Command::Check(a) => a.source.config.clone(),
            Command::Gc(a) => a.source.config.clone(),
            _ => None,
        };
        if let Some(config) = config {
            let dir = config.parent().expect("dir").to_string_lossy().into_owned();
            assert!(
                c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["mountPath"] == dir.as_str()),
                "{file}: {} is not mounted",
                config.display()
            );
        }
    }
}

#[test]
fn the_shards_their_index_and_the_merge_agree() {
    let docs = manifests();
    let runs = runs(&docs);
    let shards = runs
        .iter()
        .find_map(|r| match &r.cli.command {
            Command::Check(a) if a.shard.is_some() => Some((r, a)),
            _ => None,
        })
        .expect("a sharded check");
    let n: usize = shards
        .1
        .shard
        .as_deref()
        .and_then(|s| s.strip_prefix("auto/"))
        .and_then(|n| n.parse().ok())
        .expect("--shard auto/N");
    let job = docs
        .iter()
        .find(|(f, d)| *f == shards.0.file && d["kind"] == "Job")
        .map(|(_, d)| d)
        .expect("the shards' Job");
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["completions"].as_u64(), Some(n as u64));
    let output = shards.1.report.output.clone().expect("--output");
    let merge = runs
        .iter()
        .find_map(|r| match &r.cli.command {
            Command::Merge(a) => Some(a),
            _ => None,
        })
        .expect("a merge");
    let expected: Vec<PathBuf> = (0..n)
        .map(|k| PathBuf::from(output.to_string_lossy().replace("$(SHARD)", &k.to_string())))
        .collect();
    assert_eq!(merge.reports, expected);
    // The shards write where the merge reads.
    let dir = output.parent().expect("dir");
    assert_eq!(merge.reports[0].parent(), Some(dir));
}

/// The first ```yaml block after `heading` in README.
fn readme_block(heading: &str) -> String {
    let readme = fs::read_to_string(root().join("README.md")).expect("README");
    let at = readme.find(heading).unwrap_or_else(|| panic!("{heading}"));
    let rest = &readme[at..];
    let start = rest.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let end = rest[start..].find("```").expect("end of block");
    rest[start..start + end].to_string()
}

#[test]
fn the_containerfile_labels_this_version() {
    let text = fs::read_to_string(root().join("Containerfile")).expect("Containerfile");
    assert!(
        text.lines()
            .any(|l| l == format!("ARG VERSION={}", env!("CARGO_PKG_VERSION"))),
        "Containerfile: ARG VERSION={}",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains("ENTRYPOINT [\"/registry-audit\"]"));
}

#[test]
fn readme_shows_the_rules_deploy_prometheus_holds() {
    let file = fs::read_to_string(root().join("deploy/prometheus/registry-audit.rules.yml"))
        .expect("rules");
    assert_eq!(readme_block("Example alert rules"), file);
    assert!(Path::new(&root().join("deploy/prometheus/registry-audit.rules.test.yml")).is_file());
}
