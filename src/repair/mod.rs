//! Removing exactly the wrong cache entries, and putting them back. This module owns
//! every write registry-audit ever makes, and only to Redis keys of the registry's
//! shapes: it turns audit findings into a plan (with a snapshot of each entry's current
//! value), validates a plan read back, asks Redis up front whether the user may run
//! every command the writes need, re-checks storage (each entry against its own digest)
//! just before acting, removes each digest's entries in one Lua script that first
//! verifies they still hold the audited values - global descriptor first, so a script
//! Redis fails part-way leaves nothing served - reads back and reports such a failure,
//! and journals what it removed (fsync'd before each removal) so `restore` can put it
//! back. It reads storage (the re-check) and never writes it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::Path;

use redis::{ConnectionLike, Script};

use crate::cache::redis::CacheConn;
use serde::{Deserialize, Serialize};

use crate::cache::index as cache_index;
use crate::cache::redis::{HASH_FIELDS, brief};
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::storage::{BlobStat, Storage};
use crate::summary::SourceInfo;

pub(crate) const PLAN_SCHEMA: &str = "registry-audit-purge-plan/1";
pub(crate) const JOURNAL_SCHEMA: &str = "registry-audit-journal/1";

mod apply;
mod plan;
mod restore;
mod scripts;

pub(crate) use apply::*;
pub(crate) use plan::*;
pub(crate) use restore::*;
pub(crate) use scripts::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let b = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex(&to_hex(&b)), Some(b));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn refuses_foreign_keys() {
        assert!(check_registry_key("session:1").is_err());
        assert!(check_registry_key("repository::x").is_err());
        assert!(check_registry_key("repository::app::blobs").is_ok());
        assert!(
            check_registry_key("blobs::sha256:zz").is_ok(),
            "malformed but registry-shaped"
        );
    }

    #[test]
    fn storage_problems_are_never_purged() {
        for k in Kind::ALL {
            if k.is_storage_problem() {
                assert!(!purges(k, true), "{k:?}");
            }
        }
        assert!(!purges(Kind::MalformedCacheEntry, false));
        assert!(
            !purges(Kind::LivePhantom, true),
            "in-memory: nothing in Redis to remove"
        );
    }

    #[test]
    fn script_args_are_flat_and_share_keys() {
        let d = Digest::parse_str(&format!("sha256:{}", "ab".repeat(32))).expect("digest");
        let entries = vec![
            Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some("app".into()),
                key: "repository::app::blobs".into(),
                op: Op::Member {
                    member: d.to_string(),
                },
            },
            Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some("app".into()),
                key: format!("repository::app::blobs::{d}"),
                op: Op::Fields {
                    fields: [("mediatype".to_string(), "x".to_string())].into(),
                    exact: true,
                },
            },
        ];
        let call =
            script_args(&entries, &["repository::app::blobs".into()], Some(&d)).expect("args");
        assert_eq!(call.keys.len(), 2);
        let text: Vec<String> = call
            .argv
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            text,
            vec![
                "M".to_string(),
                "1".into(),
                d.to_string(),
                "F".into(),
                "2".into(),
                "1".into(),
                "1".into(),
                "mediatype".into(),
                "x".into(),
                "N".into(),
                "1".into(),
                d.to_string()
            ]
        );
    }

    fn journal(bytes: &[u8]) -> Result<JournalRecords, String> {
        let lines = crate::files::Lines::new(bytes, "journal", "j", u64::MAX, 1 << 16);
        parse_journal(lines, Path::new("j"))
    }

    #[test]
    fn journals_are_read_a_bounded_line_at_a_time() {
        let begin = format!(
            "{{\"type\":\"begin\",\"schema\":\"{JOURNAL_SCHEMA}\",\"started_at\":\"t\",\"source\":{{\"storage_root\":\"/r\",\"cache\":\"redis\"}}}}"
        );
        let remove = "{\"type\":\"remove\",\"seq\":0,\"digest\":null,\"entries\":[]}";
        let r = journal(format!("{begin}\n{remove}\n{{cut").as_bytes()).expect("journal");
        assert_eq!((r.removals(), r.lines_skipped), (1, 1));
        assert!(journal(b"").is_err(), "no begin line");
        let long = format!("{begin}\n{}\n", "x".repeat(1 << 17));
        let err = journal(long.as_bytes()).expect_err("endless line");
        assert!(err.contains("line 2") && err.contains("64 KiB"), "{err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn fragments() -> impl Strategy<Value = Vec<u8>> {
            let piece = proptest::sample::select(vec![
                format!("{{\"schema\":\"{PLAN_SCHEMA}\",\"created_at\":\"t\","),
                "\"source\":{\"storage_root\":\"/r\",\"cache\":\"redis\"},".to_string(),
                "\"include_malformed\":true,\"kept\":[],".to_string(),
                "\"groups\":[{\"digest\":null,\"blob\":\"not-checked\",\"entries\":[".to_string(),
                "{\"kind\":\"malformed-cache-entry\",\"repository\":null,\"key\":\"session:1\",\"op\":\"key\",\"redis_type\":\"string\",\"dump_hex\":\"zz\"}".to_string(),
                "{\"kind\":\"phantom-descriptor\",\"key\":\"blobs::\\\\xff\",\"op\":\"member\",\"member\":\"m\"}".to_string(),
                "]}]}".to_string(),
                format!("{{\"type\":\"begin\",\"schema\":\"{JOURNAL_SCHEMA}\",\"started_at\":\"t\",\"source\":{{\"storage_root\":\"/r\",\"cache\":\"redis\"}}}}\n"),
                "{\"type\":\"begin\",\"schema\":\"other\"}\n".to_string(),
                "{\"type\":\"remove\",\"seq\":18446744073709551615,\"digest\":null,\"entries\":[]}\n".to_string(),
                "{\"type\":\"result\",\"seq\":1,\"outcome\":\"removed\"}\n".to_string(),
                ",".to_string(),
                "\n".to_string(),
            ]);
            proptest::collection::vec(piece, 0..10).prop_map(|p| p.concat().into_bytes())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Arbitrary bytes are a plan or an error naming it, never a panic.
            #[test]
            fn plans_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), shaped in fragments()) {
                for input in [&bytes, &shaped] {
                    if let Err(e) = Plan::parse(Path::new("p"), input) {
                        prop_assert!(e.contains('p'), "{e}");
                    }
                }
            }

            /// Arbitrary bytes are a journal or an error naming it, never a panic.
            #[test]
            fn journals_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), shaped in fragments()) {
                for input in [&bytes, &shaped] {
                    if let Err(e) = journal(input) {
                        prop_assert!(e.contains('j'), "{e}");
                    }
                }
            }
        }
    }

    fn digest(byte: &str) -> Digest {
        Digest::parse_str(&format!("sha256:{}", byte.repeat(32))).expect("digest")
    }

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The entries purge plans for a phantom digest held in repositories `repos`, and the
    /// global descriptor when `global`.
    fn phantom_entries(d: &Digest, global: bool, repos: &[&str]) -> Vec<Entry> {
        let mut out = Vec::new();
        if global {
            out.push(Entry {
                kind: Kind::PhantomBlobDescriptor,
                severity: Severity::Error,
                repository: None,
                key: cache_index::global_key(d),
                op: Op::Fields {
                    fields: fields(&[
                        ("digest", &d.to_string()),
                        ("size", "5"),
                        ("mediatype", "m"),
                    ]),
                    exact: false,
                },
            });
        }
        for r in repos {
            out.push(Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some(r.to_string()),
                key: cache_index::repo_set_key(r),
                op: Op::Member {
                    member: d.to_string(),
                },
            });
            out.push(Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some(r.to_string()),
                key: cache_index::repo_hash_key(r, d),
                op: Op::Fields {
                    fields: fields(&[("mediatype", "m")]),
                    exact: true,
                },
            });
        }
        out
    }

    /// One digest's cache entries, and the lookups the registry answers from them - by
    /// `cache_index`'s rules, the same the audit uses.
    #[derive(Clone)]
    struct Model {
        global: BTreeMap<String, String>,
        /// repository -> (member of its set, fields of its hash)
        repos: BTreeMap<String, (bool, BTreeMap<String, String>)>,
    }

    impl Model {
        fn full(d: &Digest, repos: &[&str]) -> Model {
            Model {
                global: fields(&[
                    ("digest", &d.to_string()),
                    ("size", "5"),
                    ("mediatype", "m"),
                ]),
                repos: repos
                    .iter()
                    .map(|r| (r.to_string(), (true, fields(&[("mediatype", "m")]))))
                    .collect(),
            }
        }

        fn served(&self) -> std::collections::BTreeSet<String> {
            use cache_index::{DigestEntry, GlobalEntry, RepoEntry, RepoHash, SizeField};
            let size = match self.global.get("size").map(|s| s.parse::<i64>()) {
                None => SizeField::Missing,
                Some(Ok(n)) => SizeField::Valid(n),
                Some(Err(_)) => SizeField::Invalid,
            };
            let entry = DigestEntry {
                global: (!self.global.is_empty()).then_some(GlobalEntry::Hash {
                    has_digest: self.global.contains_key("digest"),
                    size,
                }),
                repos: &[],
            };
            let mut out = std::collections::BTreeSet::new();
            if entry.global_live() {
                out.insert("global".to_string());
            }
            for (i, (name, (member, hash))) in self.repos.iter().enumerate() {
                let r = RepoEntry {
                    repo: i as u32,
                    member: *member,
                    hash: match (hash.is_empty(), hash.contains_key("mediatype")) {
                        (true, _) => RepoHash::Absent,
                        (false, true) => RepoHash::WithMediatype,
                        (false, false) => RepoHash::WithoutMediatype,
                    },
                };
                if entry.repo_live(&r) {
                    out.insert(format!("repository {name}"));
                }
            }
            out
        }

        fn remove(&mut self, e: &Entry) {
            let raw = finding::unescape(&e.key).expect("key");
            match (cache_index::classify(&raw), &e.op) {
                (cache_index::KeyShape::Global(_), Op::Fields { fields, .. }) => {
                    fields.keys().for_each(|f| {
                        self.global.remove(f);
                    })
                }
                (cache_index::KeyShape::RepoSet(r), Op::Member { .. }) => {
                    self.repos.get_mut(&r).expect("repo").0 = false
                }
                (cache_index::KeyShape::RepoHash(r, _), Op::Fields { .. }) => {
                    self.repos.get_mut(&r).expect("repo").1.clear()
                }
                other => panic!("unexpected entry {other:?}"),
            }
        }

        /// The lookups served after removing `order[..k]`, for every k.
        fn after_each_prefix(&self, order: &[Entry]) -> Vec<std::collections::BTreeSet<String>> {
            let mut m = self.clone();
            let mut out = vec![m.served()];
            for e in order {
                m.remove(e);
                out.push(m.served());
            }
            out
        }
    }

    fn permutations(items: &[Entry]) -> Vec<Vec<Entry>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, first.clone());
                out.push(p);
            }
        }
        out
    }

    /// After any prefix of the removal order (a failure can stop it anywhere), no
    /// lookup is served that was not served before, and as few are served as any order
    /// could achieve after as many removals.
    fn assert_order_is_safe(model: &Model, entries: &[Entry]) {
        let ours = model.after_each_prefix(&removal_order(entries));
        for w in ours.windows(2) {
            assert!(w[1].is_subset(&w[0]), "a removal made a lookup live: {w:?}");
        }
        let all: Vec<_> = permutations(entries)
            .iter()
            .map(|p| model.after_each_prefix(p))
            .collect();
        for k in 0..=entries.len() {
            let best = all.iter().map(|p| p[k].len()).min().expect("some order");
            assert_eq!(
                ours[k].len(),
                best,
                "after {k} removals our order still serves {:?}",
                ours[k]
            );
        }
    }

    #[test]
    fn removing_the_global_descriptor_first_leaves_nothing_served_after_any_failure() {
        let d = digest("ab");
        let entries = phantom_entries(&d, true, &["team/a", "team/b"]);
        let model = Model::full(&d, &["team/a", "team/b"]);
        assert_eq!(model.served().len(), 3, "global and both repositories live");
        let order = removal_order(&entries);
        assert_eq!(order[0].key, cache_index::global_key(&d));
        let after = model.after_each_prefix(&order);
        for (k, served) in after.iter().enumerate().skip(1) {
            assert!(served.is_empty(), "after {k} removals: {served:?}");
        }
        assert_order_is_safe(&model, &entries);

        // The old order (members, hashes, global last) leaves the global descriptor - the
        // one that breaks a re-push - served if the last step fails.
        let mut old = entries.clone();
        old.sort_by_key(|e| match e.op {
            Op::Member { .. } => 0,
            Op::Fields { exact: true, .. } | Op::Key { .. } => 1,
            Op::Fields { exact: false, .. } => 2,
        });
        let after_old = model.after_each_prefix(&old);
        assert!(after_old[entries.len() - 1].contains("global"));
    }

    #[test]
    fn without_a_global_entry_each_repository_gate_goes_first() {
        // An unlinked blob: the global descriptor is right and stays; the repositories'
        // entries go, each repository's lookup dying with its first removal.
        let d = digest("cd");
        let entries: Vec<Entry> = phantom_entries(&d, false, &["a", "b", "c"])
            .into_iter()
            .map(|mut e| {
                e.kind = Kind::UnlinkedRepositoryBlob;
                e
            })
            .collect();
        let model = Model::full(&d, &["a", "b", "c"]);
        let order = removal_order(&entries);
        assert!(order[..3].iter().all(|e| matches!(e.op, Op::Member { .. })));
        let after = model.after_each_prefix(&order);
        assert_eq!(after[1].len(), 3, "global + two repositories");
        assert_eq!(after[3].iter().collect::<Vec<_>>(), vec!["global"]);
        assert_order_is_safe(&model, &entries);
    }

    #[test]
    fn partial_entries_and_inert_states_stay_inert() {
        // Some parts already evicted (allkeys-lru): a member without its hash, a hash
        // without its member, a global without `size`.
        let d = digest("ef");
        let entries = phantom_entries(&d, true, &["a", "b"]);
        let mut model = Model::full(&d, &["a", "b"]);
        model.global.remove("size");
        model.repos.get_mut("a").expect("a").1.clear();
        model.repos.get_mut("b").expect("b").0 = false;
        assert!(model.served().is_empty());
        for p in permutations(&entries) {
            for served in model.after_each_prefix(&p) {
                assert!(served.is_empty(), "an inert entry became live: {served:?}");
            }
        }
    }

    #[test]
    fn restore_puts_the_global_descriptor_back_last() {
        let d = digest("12");
        let entries = phantom_entries(&d, true, &["a"]);
        let order = restore_order(&entries);
        assert_eq!(
            order.last().map(|e| e.key.clone()),
            Some(cache_index::global_key(&d))
        );
    }

    /// `redis.call('NAME'` and `redis.pcall('NAME'` of a Lua script.
    fn called(script: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for pat in ["redis.call('", "redis.pcall('"] {
            for part in script.split(pat).skip(1) {
                out.insert(part.split('\'').next().unwrap_or("").to_ascii_uppercase());
            }
        }
        out
    }

    #[test]
    fn the_permission_check_asks_about_every_command_the_scripts_call() {
        for (script, table) in [
            (REMOVE_SCRIPT, REMOVE_COMMANDS),
            (RESTORE_SCRIPT, RESTORE_COMMANDS),
        ] {
            let asked: std::collections::BTreeSet<String> = table
                .iter()
                .flat_map(|(_, names)| names.iter().map(|n| n.to_string()))
                .collect();
            let calls = called(script);
            assert!(!calls.is_empty());
            assert!(calls.is_subset(&asked), "{calls:?} not all in {asked:?}");
        }
        // Each key is asked about with EVALSHA and the commands of its op.
        let script = Script::new(REMOVE_SCRIPT);
        let d = digest("ab");
        let entries = phantom_entries(&d, true, &["app"]);
        let checks = acl_checks(
            REMOVE_COMMANDS,
            &script,
            entries
                .iter()
                .map(|e| (finding::unescape(&e.key).expect("key"), op_tag(&e.op))),
        );
        let has = |name: &str, key: &str| {
            checks
                .iter()
                .any(|c| c[0] == name.as_bytes() && c.iter().any(|a| a == key.as_bytes()))
        };
        let set = cache_index::repo_set_key("app");
        let global = cache_index::global_key(&d);
        assert!(has("SREM", &set) && has("EVALSHA", &set) && has("SISMEMBER", &set));
        assert!(has("HDEL", &global) && has("HGET", &global) && has("EVALSHA", &global));
        assert!(has("HDEL", &cache_index::repo_hash_key("app", &d)));
        assert!(!has("SREM", &global), "commands follow the op");
    }

    fn plan_of(groups: Vec<Group>) -> Plan {
        Plan {
            schema: PLAN_SCHEMA.into(),
            created_at: String::new(),
            source: serde_json::from_value(serde_json::json!({
                "storage_root": "/r", "cache": "redis"
            }))
            .unwrap_or_else(|_| panic!("source info")),
            include_malformed: false,
            groups,
            kept: Vec::new(),
        }
    }

    fn group(d: &Digest, entries: Vec<Entry>) -> Group {
        Group {
            digest: Some(*d),
            blob: BlobState::Absent,
            entries,
            not_member_of: Vec::new(),
        }
    }

    #[test]
    fn a_plan_entry_must_name_its_groups_digest() {
        let (d, other) = (digest("ab"), digest("cd"));
        assert!(
            plan_of(vec![group(&d, phantom_entries(&d, true, &["a"]))])
                .validate()
                .is_ok()
        );
        // Another digest's global descriptor, set member or hash in d's group.
        for i in 0..3 {
            let mut entries = phantom_entries(&d, true, &["a"]);
            entries[i] = phantom_entries(&other, true, &["a"])[i].clone();
            let err = plan_of(vec![group(&d, entries)])
                .validate()
                .expect_err("foreign entry");
            assert!(
                err.contains("does not belong") && err.contains(&d.to_string()),
                "{err}"
            );
        }
        // A repository entry that says another repository.
        let mut entries = phantom_entries(&d, false, &["a"]);
        entries[0].repository = Some("b".into());
        assert!(plan_of(vec![group(&d, entries)]).validate().is_err());
        // A kind that does not fit the key: an "unlinked" global descriptor.
        let mut entries = phantom_entries(&d, true, &[]);
        entries[0].kind = Kind::UnlinkedRepositoryBlob;
        assert!(plan_of(vec![group(&d, entries)]).validate().is_err());
        // An orphan descriptor without the set that guards it.
        let mut entries = phantom_entries(&d, false, &["a"]);
        entries.remove(0);
        entries[0].kind = Kind::OrphanRepositoryDescriptor;
        let mut g = group(&d, entries);
        assert!(plan_of(vec![g.clone()]).validate().is_err());
        g.not_member_of.push(cache_index::repo_set_key("a"));
        assert!(plan_of(vec![g]).validate().is_ok());
        // A valid digest passed off as a malformed set member.
        let entry = Entry {
            kind: Kind::MalformedCacheEntry,
            severity: Severity::Warning,
            repository: Some("a".into()),
            key: cache_index::repo_set_key("a"),
            op: Op::Member {
                member: d.to_string(),
            },
        };
        let g = Group {
            digest: None,
            blob: BlobState::NotChecked,
            entries: vec![entry.clone()],
            not_member_of: Vec::new(),
        };
        assert!(plan_of(vec![g.clone()]).validate().is_err());
        let mut g = g;
        g.entries[0].op = Op::Member {
            member: "sha256:bad".into(),
        };
        assert!(plan_of(vec![g]).validate().is_ok());
    }

    #[test]
    fn an_entry_is_checked_against_its_own_digest() {
        let d = digest("ab");
        let entries = phantom_entries(&d, true, &["a"]);
        for e in &entries {
            assert_eq!(entry_digest(e), Some(d), "{}", e.key);
        }
        let size = Entry {
            kind: Kind::SizeMismatch,
            ..entries[0].clone()
        };
        assert_eq!(snapshot_size(&size), Some(5));
    }
}
