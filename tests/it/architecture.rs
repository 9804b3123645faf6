//! The architecture, checked by reading the source: no import cycle among the
//! top-level modules of `src/`, what each layer may import, and no Redis command that
//! writes outside `src/repair/`. Unit tests (`#[cfg(test)] mod tests` at the end of a
//! file) are left out: they may reach across layers to build their fixtures.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read src").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A file's code without its unit tests.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("read a source file");
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// `src/audit/verify.rs` -> ("audit", "verify"); `src/files.rs` -> ("files", "files").
fn module_of(src: &Path, path: &Path) -> (String, String) {
    let rel = path.strip_prefix(src).expect("under src");
    let parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    let top = parts[0].clone();
    let leaf = parts.last().cloned().unwrap_or_default();
    (top, leaf)
}

/// The `crate::a::b` paths a file names, as (a, b).
fn crate_paths(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        let word = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let first = word(rest);
        let second = rest[first.len()..]
            .strip_prefix("::")
            .map(word)
            .unwrap_or_default();
        out.insert((first, second));
    }
    out
}

struct Tree {
    /// (top-level module, file leaf, the file's code)
    files: Vec<(String, String, PathBuf, String)>,
}

fn tree() -> Tree {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = sources(&src)
        .into_iter()
        .map(|p| {
            let (top, leaf) = module_of(&src, &p);
            let text = code(&p);
            (top, leaf, p, text)
        })
        .collect();
    Tree { files }
}

#[test]
fn no_import_cycle_among_the_top_level_modules() {
    let t = tree();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (top, _, _, text) in &t.files {
        let deps = edges.entry(top.clone()).or_default();
        for (first, _) in crate_paths(text) {
            if &first != top && !first.is_empty() {
                deps.insert(first);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let from = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        let cycle = visit(n, &edges, &mut state, &mut Vec::new());
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap_or_default().join(" -> ")
        );
    }
}

#[test]
fn each_layer_imports_only_what_it_may() {
    let t = tree();
    let forbidden: [(&str, &[&str]); 2] = [
        (
            "audit",
            &["commands", "output", "repair", "cli", "settings"],
        ),
        (
            "output",
            &["storage", "cache", "registry", "repair", "commands"],
        ),
    ];
    let commands = [
        "check",
        "purge",
        "restore",
        "probe",
        "export",
        "gc",
        "merge",
        "completions",
    ];
    let mut wrong = Vec::new();
    for (top, leaf, path, text) in &t.files {
        for (first, second) in crate_paths(text) {
            for (layer, banned) in forbidden {
                if top == layer && banned.contains(&first.as_str()) {
                    wrong.push(format!("{}: {layer} imports {first}", path.display()));
                }
            }
            // A command never imports another command.
            if top == "commands"
                && first == "commands"
                && commands.contains(&second.as_str())
                && second != *leaf
            {
                wrong.push(format!(
                    "{}: command {leaf} imports command {second}",
                    path.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn only_repair_writes_to_redis() {
    let t = tree();
    let writes = [
        "DEL", "UNLINK", "HDEL", "HSET", "HMSET", "SREM", "SADD", "SET", "RESTORE", "EVAL",
        "EVALSHA", "FLUSHDB", "FLUSHALL", "EXPIRE", "RENAME",
    ];
    let mut wrong = Vec::new();
    for (top, _, path, text) in &t.files {
        if top == "repair" {
            continue;
        }
        for w in writes {
            if text.contains(&format!("cmd(\"{w}\")")) {
                wrong.push(format!("{}: sends {w}", path.display()));
            }
        }
        if text.contains("Script::new") || text.contains("redis::Script") {
            wrong.push(format!("{}: runs a Lua script", path.display()));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every file of this test binary is one of its modules: a suite left out of
/// `main.rs` would compile nowhere and prove nothing, silently.
#[test]
fn every_suite_is_a_module_of_the_test_binary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let main = fs::read_to_string(dir.join("main.rs")).expect("read main.rs");
    let mut missing = Vec::new();
    for e in fs::read_dir(&dir).expect("read tests/it").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(module) = name.strip_suffix(".rs")
            && module != "main"
            && !main.lines().any(|l| l.trim() == format!("mod {module};"))
        {
            missing.push(module.to_string());
        }
    }
    assert!(missing.is_empty(), "not in tests/it/main.rs: {missing:?}");
}
