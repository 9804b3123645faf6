//! `gc --restart-command` end to end with the real registry on its in-memory cache: the
//! restart command (a script the test writes, which stops the registry process and
//! starts it again on the same port) clears what the GC deleted, every deleted blob
//! answers 404 where it was linked, and a re-push then pull works. A command that does
//! not restart leaves live phantoms (exit 1); a registry that does not come back is
//! exit 2; with Redis the flag is refused before anything runs.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;

/// The registry process the restart script started last, stopped when the test ends
/// (the harness stops the one it started itself).
struct Restarted {
    pidfile: PathBuf,
    first: Option<u32>,
}

impl Drop for Restarted {
    fn drop(&mut self) {
        let pid = fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&p| Some(p as u32) != self.first && p > 0) {
            // SIGTERM to the registry this test started.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// Fields drop in order: the restarted registry is stopped before its directory goes.
struct Mem {
    restarted: Restarted,
    dir: Scratch,
    registry: Registry,
    app: Image,
    /// The blobs only the deleted image had, which the GC deletes: its own layer, its
    /// config, its manifest.
    own: Vec<String>,
}

/// An in-memory registry holding solo/app:v1 and keep/base:v1 (sharing a base layer),
/// with solo/app's manifest deleted: the registry still serves its blobs from memory.
fn scenario(tag: &str) -> Mem {
    let dir = Scratch::new(tag);
    let registry = Registry::start(&dir, Cache::InMemory);
    let base = bytes(7, 30_000);
    let app = make_image(&dir.path("img"), "app", &[base.clone(), bytes(8, 50_000)]);
    let keep = make_image(&dir.path("keep"), "keep", &[base]);
    let manifest = push(&registry, &app, "solo/app:v1");
    push(&registry, &keep, "keep/base:v1");
    for r in ["solo/app:v1", "keep/base:v1"] {
        let (ok, err) = pull(&registry, r, &dir.path("pulled"));
        assert!(ok, "pull {r}: {err}");
    }
    registry.delete_manifest("solo/app", &manifest);
    let own = vec![app.layers[1].clone(), app.config.clone(), manifest];
    let pidfile = dir.path("registry.pid");
    let first = registry.pid();
    fs::write(&pidfile, first.expect("running").to_string()).expect("pidfile");
    Mem {
        dir,
        registry,
        app,
        own,
        restarted: Restarted { pidfile, first },
    }
}

/// A restart script: stops the registry in the pidfile, waits until its port is free,
/// and (with `start`) starts the registry again in the background, as a service manager
/// would, writing the new pid.
fn restart_script(m: &Mem, start: bool) -> String {
    let script = m.dir.path(if start { "restart.sh" } else { "stop.sh" });
    let starting = if start {
        format!(
            "nohup docker-registry serve '{}' >>'{}' 2>&1 </dev/null &\necho $! >'{}'\n",
            m.registry.config.display(),
            m.dir.path("restarted.log").display(),
            m.restarted.pidfile.display()
        )
    } else {
        String::new()
    };
    fs::write(
        &script,
        format!(
            "#!/bin/bash\nset -eu\nkill \"$(cat '{pidfile}')\"\nwhile (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; do sleep 0.05; done\n{starting}",
            pidfile = m.restarted.pidfile.display(),
            port = m.registry.port,
        ),
    )
    .expect("script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    script.display().to_string()
}

fn gc_restart(m: &Mem, command: &str, timeout: &str) -> (i32, serde_json::Value, String) {
    let config = m.registry.config.display().to_string();
    let url = m.registry.url();
    let (code, out, err) = run_tool(&[
        "gc",
        "--config",
        &config,
        "--registry-url",
        &url,
        "--restart-command",
        command,
        "--restart-timeout",
        timeout,
        "--format",
        "json",
        "--",
        "docker-registry",
        "garbage-collect",
        &config,
    ]);
    (code, json_or_null(&out), err)
}

fn live_phantoms(r: &serde_json::Value) -> Vec<String> {
    r["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == "live-phantom")
        .map(|f| f["digest"].as_str().expect("digest").to_string())
        .collect()
}

#[test]
fn gc_with_a_restart_leaves_no_deleted_blob_served_and_a_re_push_pulls() {
    let m = scenario("gcrestart");
    // Before: the registry answers for what it is about to lose.
    assert_eq!(m.registry.head_blob("solo/app", &m.own[0]), Some(200));
    let script = restart_script(&m, true);
    let (code, r, err) = gc_restart(&m, &script, "60s");
    assert_eq!(code, 0, "{err}\n{r:#}");
    let g = &r["summary"]["gc"];
    assert_eq!(g["blobs_deleted"], 3, "{g:#}");
    assert_eq!(g["restart_needed"], false, "{g:#}");
    assert_eq!(g["restart"]["restarted"], true, "{g:#}");
    assert_eq!(g["restart"]["still_served"], 0, "{g:#}");
    assert_eq!(g["restart"]["failed"], 0, "{g:#}");
    // Every deleted blob in the one repository that linked it: the layer and the
    // config. The manifest's revision link went with the manifest DELETE, so no HEAD of
    // a blob reaches it; the re-push below shows the restart cleared it too.
    assert_eq!(g["restart"]["probed"], 2, "{g:#}");
    assert_eq!(g["restart"]["deleted_blobs_linked_nowhere"], 1, "{g:#}");
    assert!(live_phantoms(&r).is_empty(), "{r:#}");
    assert!(
        r["notes"]
            .as_array()
            .expect("notes")
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("restarted"))),
        "{r:#}"
    );
    // The registry really is a new process now, and it serves none of them.
    let pid = fs::read_to_string(&m.restarted.pidfile).expect("pidfile");
    assert_ne!(
        Some(pid.trim().to_string()),
        m.registry.pid().map(|p| p.to_string())
    );
    for d in &m.own {
        assert!(!m.registry.has_blob(d), "GC deletes {d}");
        assert_eq!(m.registry.head_blob("solo/app", d), Some(404), "{d}");
    }
    // The base layer the other image keeps is still there and served.
    assert_eq!(
        m.registry.head_blob("keep/base", &m.app.layers[0]),
        Some(200)
    );
    // A re-push uploads everything again, and the image pulls.
    push(&m.registry, &m.app, "solo/app:v1");
    let (ok, err) = pull(&m.registry, "solo/app:v1", &m.dir.path("after"));
    assert!(ok, "{err}");
}

#[test]
fn a_restart_command_that_does_not_restart_leaves_live_phantoms_and_exits_1() {
    let m = scenario("gcnorestart");
    let (code, r, err) = gc_restart(&m, "echo pretending to restart", "2s");
    assert_eq!(code, 1, "{err}\n{r:#}");
    // The command's output goes to stderr: stdout is the report's.
    assert!(err.contains("pretending to restart"), "{err}");
    let g = &r["summary"]["gc"];
    assert_eq!(g["restart_needed"], true, "{g:#}");
    assert_eq!(g["restart"]["still_served"], 2, "{g:#}");
    let mut live = live_phantoms(&r);
    live.sort();
    let mut own = m.own[..2].to_vec();
    own.sort();
    assert_eq!(live, own);
    assert!(
        r["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .any(|f| f["detail"]
                .as_str()
                .is_some_and(|d| d.contains("still answered 200 after the restart"))),
        "{r:#}"
    );
}

#[test]
fn a_registry_that_does_not_come_back_is_exit_2_and_says_what_to_do() {
    let m = scenario("gcnoback");
    let script = restart_script(&m, false);
    let (code, r, err) = gc_restart(&m, &script, "3s");
    assert_eq!(code, 2, "{err}");
    assert!(r.is_null());
    assert!(
        err.contains("did not answer within --restart-timeout 3s"),
        "{err}"
    );
    assert!(err.contains("registry-audit probe"), "{err}");
    assert_eq!(
        err.trim()
            .lines()
            .last()
            .map(|l| l.starts_with("registry-audit:")),
        Some(true),
        "{err}"
    );
}

#[test]
fn with_redis_the_restart_command_is_refused_before_the_gc() {
    let dir = Scratch::new("gcrestartredis");
    let redis = Redis::start();
    let registry = Registry::start(&dir, Cache::Redis(&redis));
    let app = make_image(&dir.path("img"), "app", &[bytes(9, 1000)]);
    push(&registry, &app, "solo/app:v1");
    let config = registry.config.display().to_string();
    let marker = dir.path("gc-ran");
    let gc = format!("touch '{}'", marker.display());
    let (code, out, err) = run_tool(&[
        "gc",
        "--config",
        &config,
        "--registry-url",
        &registry.url(),
        "--restart-command",
        "true",
        "--",
        "sh",
        "-c",
        &gc,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("no restart is needed"), "{err}");
    assert!(!marker.exists(), "the GC must not run");
}
