//! Hostile inputs and outputs: every file the tool reads has a bound (a device, a FIFO
//! or a file of gigabytes is refused within seconds, exit 2, in one line naming the path
//! and the limit), a cut or mended cache dump makes the run incomplete, a Redis whose
//! SCAN never ends is stopped, --jobs is capped, and no output ever replaces a device,
//! FIFO, directory or symlink.

use crate::common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long any refusal may take: seconds, never a hang on a FIFO or a read of gigabytes.
const QUICK: Duration = Duration::from_secs(20);

/// Runs the tool with a time limit (killed past it, and the test fails); returns exit
/// code, stdout, stderr.
fn run_bounded(args: &[&str], limit: Duration) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("REGISTRY_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().expect("run registry-audit");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("registry-audit {args:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        out.join().expect("stdout"),
        err.join().expect("stderr"),
    )
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// A file of `len` bytes that uses no disk (a hole).
fn sparse(path: &Path, len: u64) {
    fs::File::create(path)
        .and_then(|f| f.set_len(len))
        .expect("sparse file");
}

/// Exit 2, within seconds, one line that names `path` and a limit.
fn assert_refused(args: &[&str], path: &str) {
    let (code, out, err) = run_bounded(args, QUICK);
    assert_eq!(code, 2, "{args:?}: {err}{out}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line: {err}");
    assert!(lines[0].contains(path), "{args:?}: names the path: {err}");
    assert!(
        lines[0].contains("limit"),
        "{args:?}: names the limit: {err}"
    );
}

#[test]
fn devices_fifos_and_huge_files_are_refused_as_inputs_within_seconds() {
    let dir = Scratch::new("hostile-in");
    let store = Store::new("hostile-in-root");
    let root = store.root();
    let huge = dir.path("huge");
    sparse(&huge, 6 << 30);
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let nowhere = "redis://127.0.0.1:1/0";
    for input in ["/dev/zero".to_string(), path_str(&huge), path_str(&fifo)] {
        let x = input.as_str();
        assert_refused(&["check", "--config", x, "--storage-only"], x);
        assert_refused(&["check", "--root", &root, "--cache-dump", x], x);
        assert_refused(
            &["check", "--root", &root, "--storage-only", "--state", x],
            x,
        );
        assert_refused(
            &["purge", "--root", &root, "--redis", nowhere, "--apply", x],
            x,
        );
        assert_refused(&["restore", "--journal", x, "--redis", nowhere], x);
        assert_refused(&["merge", x], x);
        assert_refused(&["export-cache", "--config", x], x);
    }
    // Nothing was written next to them (no lock beside a refused state).
    assert!(!dir.path("huge.lock").exists());
    assert_eq!(fs::metadata(&huge).expect("huge").len(), 6 << 30);
}

#[test]
fn one_endless_line_stops_the_line_readers() {
    let dir = Scratch::new("hostile-lines");
    let store = Store::new("hostile-lines-root");
    let root = store.root();
    // Under the total limits, but one line of zeros longer than the line limits.
    let zeros = dir.path("zeros.jsonl");
    sparse(&zeros, 100 << 20);
    let z = path_str(&zeros);
    assert_refused(&["check", "--root", &root, "--cache-dump", &z], &z);
    assert_refused(
        &[
            "restore",
            "--journal",
            &z,
            "--redis",
            "redis://127.0.0.1:1/0",
        ],
        &z,
    );
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// What a special target looks like, to prove it untouched.
fn fingerprint(path: &Path) -> String {
    let m = fs::symlink_metadata(path).expect("target exists");
    let t = m.file_type();
    if t.is_symlink() {
        format!(
            "link to {} holding {:?}",
            fs::read_link(path).expect("link").display(),
            fs::read_to_string(path).ok()
        )
    } else if t.is_dir() {
        format!(
            "dir of {} entries",
            fs::read_dir(path).expect("dir").count()
        )
    } else if t.is_fifo() {
        "fifo".into()
    } else if t.is_char_device() {
        "char device".into()
    } else {
        format!("file {:?}", fs::read(path).expect("file"))
    }
}

#[test]
fn outputs_never_replace_a_device_fifo_directory_or_symlink() {
    let dir = Scratch::new("hostile-out");
    let store = Store::new("hostile-out-root");
    let root = store.root();
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let subdir = dir.path("adir");
    fs::create_dir(&subdir).expect("dir");
    let precious = dir.path("precious.txt");
    fs::write(&precious, "keep me").expect("write");
    let link = dir.path("link");
    std::os::unix::fs::symlink(&precious, &link).expect("symlink");
    let report = dir.path("report.json");
    fs::write(&report, "{}").expect("write");
    let (rep, nowhere) = (path_str(&report), "redis://127.0.0.1:1/0");

    for target in [
        "/dev/null".into(),
        path_str(&fifo),
        path_str(&subdir),
        path_str(&link),
    ] {
        let t = target.as_str();
        let before = fingerprint(Path::new(t));
        let cases: Vec<Vec<&str>> = vec![
            vec!["check", "--root", &root, "--storage-only", "--output", t],
            vec![
                "check",
                "--root",
                &root,
                "--storage-only",
                "--format",
                "prometheus",
                "--output",
                t,
            ],
            vec!["check", "--root", &root, "--storage-only", "--state", t],
            vec!["check", "--root", &root, "--storage-only", "--lock", t],
            vec!["export-cache", "--redis", nowhere, "--output", t],
            vec![
                "purge",
                "--root",
                &root,
                "--redis",
                nowhere,
                "--plan-out",
                t,
            ],
            vec!["purge", "--root", &root, "--redis", nowhere, "--journal", t],
            vec!["merge", &rep, "--output", t],
        ];
        for args in cases {
            let (code, out, err) = run_bounded(&args, QUICK);
            assert_eq!(code, 2, "{args:?}: {err}{out}");
            assert!(err.contains(t), "{args:?}: names the path: {err}");
            assert_eq!(fingerprint(Path::new(t)), before, "{args:?} touched {t}");
        }
    }
    assert_eq!(fs::read_to_string(&precious).expect("read"), "keep me");

    // `-` is stdout where a report goes; a regular file is replaced as before.
    let (code, out, err) = run_bounded(
        &[
            "check",
            "--root",
            &root,
            "--storage-only",
            "--format",
            "json",
            "--output",
            "-",
        ],
        QUICK,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["complete"], true);
    assert!(!Path::new("-").exists());
    let (code, _, err) = run_bounded(
        &[
            "check",
            "--root",
            &root,
            "--storage-only",
            "--format",
            "json",
            "--output",
            &rep,
        ],
        QUICK,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&fs::read_to_string(&report).expect("report"))["command"],
        "check"
    );
}

/// A store with blobs, and a Redis whose entries all match it: a clean audit.
fn clean_cache(tag: &str) -> (Store, Redis) {
    let store = Store::new(tag);
    let redis = Redis::start();
    let mut c = redis.conn();
    for (i, repo) in ["app", "team/web", "team/db"].iter().enumerate() {
        for j in 0..3u64 {
            let content = bytes(10 * i as u64 + j, 1000 + j as usize);
            let d = store.blob(repo, &content);
            cache(&mut c, repo, &d, content.len());
        }
    }
    (store, redis)
}

#[test]
fn a_dump_cut_at_a_line_boundary_or_with_a_wrong_count_is_incomplete() {
    let (store, redis) = clean_cache("hostile-dump");
    let dir = Scratch::new("hostile-dump-files");
    let root = store.root();
    let dump = dir.path("cache.jsonl");
    let d = path_str(&dump);
    let (code, _, err) = run_tool(&["export-cache", "--redis", &redis.url(), "--output", &d]);
    assert_eq!(code, 0, "{err}");
    let text = fs::read_to_string(&dump).expect("dump");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 5);
    let trailer: serde_json::Value = serde_json::from_str(lines[lines.len() - 1]).expect("trailer");
    assert_eq!(trailer["end"], "registry-audit-cache-dump");
    assert_eq!(
        trailer["keys"],
        9 + 3 + 9,
        "9 descriptors, 3 sets, 9 repository hashes"
    );
    assert_eq!(trailer["set_members"], 9);

    let check = |path: &str| {
        let (code, out, err) = run_tool(&[
            "check",
            "--root",
            &root,
            "--cache-dump",
            path,
            "--format",
            "json",
        ]);
        (code, json(&out), err)
    };
    let (code, report, err) = check(&d);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["complete"], true, "{report:#}");
    assert_eq!(report["summary"]["keys_scanned"], 21);

    // Cut at a line boundary: the last entries and the trailer are gone.
    let cut = dir.path("cut.jsonl");
    fs::write(&cut, lines[..lines.len() - 3].join("\n") + "\n").expect("write");
    let (code, report, err) = check(&path_str(&cut));
    assert!(code >= 1, "{err}");
    assert_eq!(report["complete"], false, "{report:#}");
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("no end line") && notes.contains("re-export"),
        "{notes}"
    );
    // What was read is audited: every line but the two cut holds one key.
    assert_eq!(report["summary"]["keys_scanned"], 19, "{report:#}");

    // A trailer whose counts disagree with the lines before it (one line dropped).
    let mended = dir.path("mended.jsonl");
    let mut kept: Vec<&str> = lines.clone();
    kept.remove(2);
    fs::write(&mended, kept.join("\n") + "\n").expect("write");
    let (code, report, err) = check(&path_str(&mended));
    assert!(code >= 1, "{err}");
    assert_eq!(report["complete"], false, "{report:#}");
    assert!(
        report["notes"]
            .to_string()
            .contains("says it holds 21 keys"),
        "{report:#}"
    );
}

/// A fake Redis whose SCAN never returns cursor 0: with `keys`, every reply carries
/// that many new keys; without, empty batches forever. Answers the commands a
/// connection sends first (PING, INFO, DBSIZE, CLIENT SETINFO...).
fn endless_scan_server(keys: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn, keys));
        }
    });
    port
}

fn serve(conn: TcpStream, keys: usize) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut out = conn;
    let mut next_key = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let Some(n) = line
            .trim()
            .strip_prefix('*')
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return;
        };
        let mut args = Vec::new();
        for _ in 0..n {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let len: usize = line.trim().trim_start_matches('$').parse().unwrap_or(0);
            let mut buf = vec![0; len + 2];
            if reader.read_exact(&mut buf).is_err() {
                return;
            }
            buf.truncate(len);
            args.push(String::from_utf8_lossy(&buf).to_ascii_uppercase());
        }
        let reply = match args.first().map(String::as_str) {
            Some("PING") => "+PONG\r\n".to_string(),
            Some("INFO") => {
                let body = "# Cluster\r\ncluster_enabled:0\r\n";
                format!("${}\r\n{body}\r\n", body.len())
            }
            Some("DBSIZE") => ":10\r\n".to_string(),
            Some("SCAN") => {
                let mut r = format!("*2\r\n$1\r\n7\r\n*{keys}\r\n");
                for _ in 0..keys {
                    let k = format!("other-app:{next_key}");
                    next_key += 1;
                    r.push_str(&format!("${}\r\n{k}\r\n", k.len()));
                }
                r
            }
            _ => "+OK\r\n".to_string(),
        };
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn a_redis_whose_scan_never_ends_is_stopped() {
    let store = Store::new("hostile-scan");
    let root = store.root();
    for keys in [50, 0] {
        let url = format!("redis://127.0.0.1:{}/0", endless_scan_server(keys));
        let (code, out, err) = run_bounded(
            &[
                "check", "--root", &root, "--redis", &url, "--format", "json",
            ],
            Duration::from_secs(60),
        );
        assert_eq!(code, 2, "{err}{out}");
        assert!(err.contains("did not finish its SCAN"), "{err}");
        assert!(err.contains("DBSIZE says 10"), "{err}");
        let (code, _, err) =
            run_bounded(&["export-cache", "--redis", &url], Duration::from_secs(60));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("did not finish its SCAN"), "{err}");
    }
}

#[test]
fn jobs_beyond_the_bound_are_capped_with_a_note() {
    let store = Store::new("hostile-jobs");
    let root = store.root();
    let (code, out, err) = run_bounded(
        &[
            "check",
            "--root",
            &root,
            "--storage-only",
            "--jobs",
            "100000",
            "--format",
            "json",
        ],
        QUICK,
    );
    assert_eq!(code, 0, "{err}");
    let report = json(&out);
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("--jobs 100000 is more than the limit"),
        "{notes}"
    );
    assert!(err.contains("--jobs 100000"), "also said on stderr: {err}");
}
