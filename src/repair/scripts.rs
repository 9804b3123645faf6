//! The Lua scripts that remove (and restore) one digest's entries atomically, only
//! while they still hold the audited values, and the up-front check that the Redis
//! user may run every command they need (ACL DRYRUN, or the script-side check).

use super::*;

/// Checks that every entry of a group still holds its planned value and then removes
/// them all, or changes nothing: one script, so Redis runs it atomically - but Redis
/// does not undo what a script did before an error (a command the user's ACL refuses),
/// so the ops come in `removal_order` and the caller re-reads the keys after an error.
/// ARGV is flat and binary-safe: per op a tag, a key index, then the op's values.
/// Every command it calls is in `script_commands`, which the permission check asks about.
pub(super) const REMOVE_SCRIPT: &str = r#"
local function hash_matches(key, exact, n, base)
  if redis.call('TYPE', key).ok ~= 'hash' then return false end
  if exact == '1' and redis.call('HLEN', key) ~= n then return false end
  for i = 0, n - 1 do
    if redis.call('HGET', key, ARGV[base + 2 * i]) ~= ARGV[base + 2 * i + 1] then return false end
  end
  return true
end
local function walk(apply)
  local i = 1
  while i <= #ARGV do
    local tag, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
    if tag == 'F' then
      local exact, n = ARGV[i + 2], tonumber(ARGV[i + 3])
      if apply then
        -- One HDEL for all the fields (in chunks only for a huge hash): a descriptor
        -- loses `digest` and `size` together.
        local names = {}
        for j = 0, n - 1 do names[#names + 1] = ARGV[i + 4 + 2 * j] end
        for s = 1, #names, 200 do
          redis.call('HDEL', key, unpack(names, s, math.min(s + 199, #names)))
        end
      elseif not hash_matches(key, exact, n, i + 4) then return false end
      i = i + 4 + 2 * n
    elseif tag == 'M' or tag == 'N' then
      local t = redis.call('TYPE', key).ok
      local is = (t == 'set') and redis.call('SISMEMBER', key, ARGV[i + 2]) == 1
      if apply then
        if tag == 'M' then redis.call('SREM', key, ARGV[i + 2]) end
      elseif (tag == 'M') ~= is then return false end
      i = i + 3
    elseif tag == 'K' then
      if apply then redis.call('DEL', key)
      elseif redis.call('TYPE', key).ok ~= ARGV[i + 2] or redis.call('DUMP', key) ~= ARGV[i + 3] then return false end
      i = i + 4
    else
      return redis.error_reply('registry-audit: bad op ' .. tostring(tag))
    end
  end
  return true
end
local function all_gone()
  local i = 1
  while i <= #ARGV do
    local tag, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
    if tag == 'F' then
      local n = tonumber(ARGV[i + 3])
      if redis.call('TYPE', key).ok == 'hash' then
        -- One HMGET for all the fields (in chunks only for a huge hash).
        local names = {}
        for j = 0, n - 1 do names[#names + 1] = ARGV[i + 4 + 2 * j] end
        for s = 1, #names, 200 do
          for _, v in ipairs(redis.call('HMGET', key, unpack(names, s, math.min(s + 199, #names)))) do
            if v then return false end
          end
        end
      elseif redis.call('EXISTS', key) == 1 then return false end
      i = i + 4 + 2 * n
    elseif tag == 'M' then
      if redis.call('TYPE', key).ok == 'set' and redis.call('SISMEMBER', key, ARGV[i + 2]) == 1 then return false end
      i = i + 3
    elseif tag == 'N' then
      i = i + 3
    else
      if redis.call('EXISTS', key) == 1 then return false end
      i = i + 4
    end
  end
  return true
end
if walk(false) then
  walk(true)
  return 1
end
if all_gone() then return 2 end
return 0
"#;

/// Puts journalled entries back where nothing has been written since.
pub(super) const RESTORE_SCRIPT: &str = r#"
local restored = 0
local i = 1
while i <= #ARGV do
  local tag, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if tag == 'F' then
    local n = tonumber(ARGV[i + 3])
    local t = redis.call('TYPE', key).ok
    local free = (t == 'none') or (t == 'hash')
    if t == 'hash' then
      for j = 0, n - 1 do
        if redis.call('HEXISTS', key, ARGV[i + 4 + 2 * j]) == 1 then free = false end
      end
    end
    if free then
      -- One HSET for all the fields (in chunks only for a huge hash).
      local kv = {}
      for j = 0, 2 * n - 1 do kv[#kv + 1] = ARGV[i + 4 + j] end
      for s = 1, #kv, 400 do
        redis.call('HSET', key, unpack(kv, s, math.min(s + 399, #kv)))
      end
      restored = restored + 1
    end
    i = i + 4 + 2 * n
  elseif tag == 'M' then
    local t = redis.call('TYPE', key).ok
    if (t == 'none' or t == 'set') and redis.call('SISMEMBER', key, ARGV[i + 2]) == 0 then
      redis.call('SADD', key, ARGV[i + 2])
      restored = restored + 1
    end
    i = i + 3
  elseif tag == 'K' then
    if redis.call('EXISTS', key) == 0 then
      redis.call('RESTORE', key, 0, ARGV[i + 3])
      restored = restored + 1
    end
    i = i + 4
  else
    return redis.error_reply('registry-audit: bad op ' .. tostring(tag))
  end
end
return restored
"#;

/// One script call: KEYS and a flat, binary-safe ARGV.
pub(super) struct ScriptCall {
    pub(super) keys: Vec<Vec<u8>>,
    pub(super) argv: Vec<Vec<u8>>,
}

impl ScriptCall {
    pub(super) fn invoke(
        &self,
        script: &Script,
        conn: &mut dyn ConnectionLike,
    ) -> redis::RedisResult<i64> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k.as_slice());
        }
        for a in &self.argv {
            inv.arg(a.as_slice());
        }
        inv.invoke(conn)
    }
}

/// Encodes entries as the scripts' KEYS and ARGV.
pub(super) fn script_args(
    entries: &[Entry],
    not_member_of: &[String],
    digest: Option<&Digest>,
) -> Result<ScriptCall, String> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut argv: Vec<Vec<u8>> = Vec::new();
    let key_index = |keys: &mut Vec<Vec<u8>>, raw: Vec<u8>| -> Vec<u8> {
        let pos = keys.iter().position(|k| *k == raw).unwrap_or_else(|| {
            keys.push(raw);
            keys.len() - 1
        });
        (pos + 1).to_string().into_bytes()
    };
    let unesc =
        |s: &str| finding::unescape(s).ok_or_else(|| format!("{s:?} is not in escaped form"));
    for e in entries {
        let raw = check_registry_key(&e.key)?;
        let idx = key_index(&mut keys, raw);
        match &e.op {
            Op::Fields { fields, exact } => {
                argv.push(b"F".to_vec());
                argv.push(idx);
                argv.push(if *exact { b"1".to_vec() } else { b"0".to_vec() });
                argv.push(fields.len().to_string().into_bytes());
                for (k, v) in fields {
                    argv.push(unesc(k)?);
                    argv.push(unesc(v)?);
                }
            }
            Op::Member { member } => {
                argv.push(b"M".to_vec());
                argv.push(idx);
                argv.push(unesc(member)?);
            }
            Op::Key {
                redis_type,
                dump_hex,
            } => {
                argv.push(b"K".to_vec());
                argv.push(idx);
                argv.push(redis_type.clone().into_bytes());
                argv.push(from_hex(dump_hex).ok_or("dump payload is not hex")?);
            }
        }
    }
    if let Some(d) = digest {
        for set in not_member_of {
            let raw = check_registry_key(set)?;
            let idx = key_index(&mut keys, raw);
            argv.push(b"N".to_vec());
            argv.push(idx);
            argv.push(d.to_string().into_bytes());
        }
    }
    Ok(ScriptCall { keys, argv })
}

/// How the Redis user's permissions were established before the first write.
/// Ordered strongest first: a cluster's check is as good as its weakest node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PermissionMethod {
    /// `ACL DRYRUN` for the connected user (Redis 7, a user that may run `ACL`).
    AclDryrun,
    /// `redis.acl_check_cmd` inside a script (Redis 7, a user that may not run `ACL`).
    AclCheckCmd,
    /// Redis has neither (before 7): not checked up front. The removal order still
    /// leaves nothing live behind a refusal, and the run stops and says what it left.
    #[default]
    NotChecked,
}

/// The outcome of the up-front permission check (a refusal is an error instead).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PermissionCheck {
    pub method: PermissionMethod,
    /// The Redis user the commands run as (`ACL WHOAMI`).
    pub user: String,
    /// Distinct (command, key) pairs asked about, on every node.
    pub commands_checked: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One command as the server's ACL sees it: name (and subcommand), key, and
/// placeholders where ACL looks at neither.
pub(super) type AclCheck = Vec<Vec<u8>>;

/// The commands `REMOVE_SCRIPT` calls per op tag, with the reads `apply` makes around
/// it (`all_gone`, and the re-read and liveness check after a failure).
pub(super) const REMOVE_COMMANDS: &[(&str, &[&str])] = &[
    ("F", &["TYPE", "HLEN", "HGET", "HDEL", "EXISTS", "HMGET"]),
    ("M", &["TYPE", "SISMEMBER", "SREM"]),
    ("N", &["TYPE", "SISMEMBER"]),
    ("K", &["TYPE", "DUMP", "DEL", "EXISTS"]),
];

/// The commands `RESTORE_SCRIPT` calls per op tag.
pub(super) const RESTORE_COMMANDS: &[(&str, &[&str])] = &[
    ("F", &["TYPE", "HEXISTS", "HSET"]),
    ("M", &["TYPE", "SISMEMBER", "SADD"]),
    ("K", &["EXISTS", "RESTORE"]),
];

pub(super) fn op_tag(op: &Op) -> &'static str {
    match op {
        Op::Fields { .. } => "F",
        Op::Member { .. } => "M",
        Op::Key { .. } => "K",
    }
}

/// `name key` with placeholder arguments of the right arity.
pub(super) fn command_on(name: &str, key: &[u8]) -> AclCheck {
    let mut c = vec![name.as_bytes().to_vec(), key.to_vec()];
    match name {
        "TYPE" | "HLEN" | "EXISTS" | "DUMP" | "DEL" => {}
        "HSET" => c.extend([b"x".to_vec(), b"x".to_vec()]),
        "RESTORE" => c.extend([b"0".to_vec(), b"x".to_vec()]),
        _ => c.push(b"x".to_vec()),
    }
    c
}

/// Every command a run of `script` over these (key, op tag) pairs sends, once each:
/// EVALSHA naming each key, and each command the script calls on it.
pub(super) fn acl_checks<'a>(
    table: &[(&str, &[&str])],
    script: &Script,
    ops: impl Iterator<Item = (Vec<u8>, &'a str)>,
) -> Vec<AclCheck> {
    let mut out = std::collections::BTreeSet::new();
    for (key, tag) in ops {
        out.insert(vec![
            b"EVALSHA".to_vec(),
            script.get_hash().as_bytes().to_vec(),
            b"1".to_vec(),
            key.clone(),
        ]);
        for (t, names) in table {
            if *t == tag {
                for name in *names {
                    out.insert(command_on(name, &key));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Asks Redis, before the first write, whether the connected user may run every command
/// in `checks` (and load `script`): `ACL DRYRUN` where the user may run it, else
/// `redis.acl_check_cmd` in a script, else (Redis before 7) a note. In a cluster every
/// master is asked, since each node has its own ACL. A refusal is an error that names
/// the command, the key and the user; `verb` says what did not happen ("removed").
pub(crate) fn check_permissions(
    conn: &mut CacheConn,
    checks: &[AclCheck],
    script: &Script,
    verb: &str,
) -> Result<PermissionCheck, String> {
    match conn {
        CacheConn::Single(c) => check_node(c, checks, script, verb, None),
        CacheConn::Cluster(cluster) => {
            let masters = cluster.slot_map()?.masters();
            let mut total = PermissionCheck {
                method: PermissionMethod::AclDryrun,
                ..PermissionCheck::default()
            };
            for (host, port) in masters {
                let mut node = cluster.node(&host, port)?;
                let name = format!("{host}:{port}");
                let one = check_node(&mut node, checks, script, verb, Some(&name))?;
                total.method = total.method.max(one.method);
                total.commands_checked += one.commands_checked;
                if total.user.is_empty() {
                    total.user = one.user;
                }
                if total.note.is_none() {
                    total.note = one.note.map(|n| format!("{name}: {n}"));
                }
            }
            Ok(total)
        }
    }
}

/// Checks one server.
pub(super) fn check_node(
    c: &mut dyn ConnectionLike,
    checks: &[AclCheck],
    script: &Script,
    verb: &str,
    node: Option<&str>,
) -> Result<PermissionCheck, String> {
    let user = whoami(c);
    let mut all: Vec<AclCheck> = Vec::with_capacity(checks.len() + 1);
    // EVALSHA of a script the server does not hold yet loads it first.
    let loaded = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(script.get_hash())
        .query::<Vec<bool>>(c)
        .is_ok_and(|v| v == [true]);
    if !loaded {
        all.push(vec![
            b"SCRIPT".to_vec(),
            b"LOAD".to_vec(),
            b"return 1".to_vec(),
        ]);
    }
    all.extend_from_slice(checks);
    let refused = |check: &AclCheck, why: &str| {
        let name = String::from_utf8_lossy(&check[0]).to_ascii_uppercase();
        let (command, key) = match name.as_str() {
            "SCRIPT" => ("SCRIPT LOAD".to_string(), None),
            "EVALSHA" => (name, check.get(3)),
            _ => (name, check.get(1)),
        };
        format!(
            "Redis user '{}' may not run {command}{}{} ({}): nothing was {verb}; grant the user the commands purge and restore need (listed in the README's purge section) or use one that has them",
            finding::escape(user.as_deref().unwrap_or("(unknown)").as_bytes()),
            key.map(|k| format!(" on key {}", finding::escape(k)))
                .unwrap_or_default(),
            node.map(|n| format!(" on node {n}")).unwrap_or_default(),
            finding::escape(why.trim().as_bytes()),
        )
    };
    let mut note = None;
    if let Some(u) = &user {
        match dryrun(c, u, &all) {
            Ok(None) => {
                return Ok(PermissionCheck {
                    method: PermissionMethod::AclDryrun,
                    user: u.clone(),
                    commands_checked: all.len() as u64,
                    note: None,
                });
            }
            Ok(Some((i, why))) => return Err(refused(&all[i], &why)),
            Err(why) => note = Some(why),
        }
    }
    match acl_check_cmd(c, &all) {
        Ok(AclAnswer::Allowed) => Ok(PermissionCheck {
            method: PermissionMethod::AclCheckCmd,
            user: user.unwrap_or_default(),
            commands_checked: all.len() as u64,
            note: None,
        }),
        Ok(AclAnswer::Refused(i, why)) => Err(refused(&all[i], &why)),
        Ok(AclAnswer::Unavailable) => Ok(PermissionCheck {
            method: PermissionMethod::NotChecked,
            user: user.unwrap_or_default(),
            commands_checked: 0,
            note: Some(format!(
                "permissions not checked up front: this Redis has neither ACL DRYRUN nor redis.acl_check_cmd (Redis 7){}",
                note.map(|n| format!("; ACL DRYRUN: {n}"))
                    .unwrap_or_default()
            )),
        }),
        // The check script itself was refused: EVALSHA or SCRIPT LOAD, which every
        // removal needs too.
        Err(e) => {
            let text = brief(&e);
            let lower = text.to_ascii_lowercase();
            let what = if lower.contains("script|load") {
                vec![b"SCRIPT".to_vec(), b"LOAD".to_vec()]
            } else if lower.contains("noperm") {
                vec![b"EVALSHA".to_vec()]
            } else {
                return Err(format!(
                    "checking the Redis user's permissions failed: {text}; nothing was {verb}"
                ));
            };
            Err(refused(&what, &text))
        }
    }
}

/// The connected user: `ACL WHOAMI`, or `CLIENT INFO` for a user that may not run ACL.
pub(super) fn whoami(c: &mut dyn ConnectionLike) -> Option<String> {
    if let Ok(u) = redis::cmd("ACL").arg("WHOAMI").query::<String>(c) {
        return Some(u);
    }
    let info: String = redis::cmd("CLIENT").arg("INFO").query(c).ok()?;
    info.split_whitespace()
        .find_map(|f| f.strip_prefix("user="))
        .map(str::to_string)
}

/// `ACL DRYRUN` for each check, pipelined: `Ok(None)` all allowed, `Ok(Some((index,
/// reason)))` the first refused, `Err` when DRYRUN itself is unavailable.
pub(super) fn dryrun(
    c: &mut dyn ConnectionLike,
    user: &str,
    checks: &[AclCheck],
) -> Result<Option<(usize, String)>, String> {
    // Is DRYRUN there, and may this user run it? (Any answer about PING says yes.)
    redis::cmd("ACL")
        .arg("DRYRUN")
        .arg(user)
        .arg("PING")
        .query::<redis::Value>(c)
        .map_err(|e| brief(&e))?;
    for (n, batch) in checks.chunks(500).enumerate() {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for check in batch {
            let cmd = pipe.cmd("ACL").arg("DRYRUN").arg(user);
            for a in check {
                cmd.arg(a.as_slice());
            }
        }
        let replies: Vec<redis::Value> = pipe.query(c).map_err(|e| brief(&e))?;
        for (i, reply) in replies.iter().enumerate() {
            let why = match reply {
                redis::Value::Okay => continue,
                redis::Value::SimpleString(s) if s == "OK" => continue,
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Value::SimpleString(s) => s.clone(),
                redis::Value::ServerError(e) => e.to_string(),
                other => format!("unexpected answer {other:?}"),
            };
            return Ok(Some((n * 500 + i, why)));
        }
    }
    Ok(None)
}

pub(super) enum AclAnswer {
    Allowed,
    Refused(usize, String),
    Unavailable,
}

/// Asks the server from inside a script whether the current user may run each command.
/// ARGV: per command, its argument count then its arguments.
pub(super) const CHECK_SCRIPT: &str = r#"
if type(redis.acl_check_cmd) ~= 'function' then return {-1, ''} end
local i, n = 1, 0
while i <= #ARGV do
  local c = tonumber(ARGV[i])
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(ARGV, i + 1, i + c))
  if not ok then
    if type(allowed) == 'table' then allowed = allowed.err end
    return {n + 1, tostring(allowed)}
  end
  if not allowed then return {n + 1, 'the ACL refuses it'} end
  n = n + 1
  i = i + 1 + c
end
return {0, ''}
"#;

pub(super) fn acl_check_cmd(
    c: &mut dyn ConnectionLike,
    checks: &[AclCheck],
) -> redis::RedisResult<AclAnswer> {
    let script = Script::new(CHECK_SCRIPT);
    for (n, batch) in checks.chunks(300).enumerate() {
        let mut inv = script.prepare_invoke();
        for check in batch {
            inv.arg(check.len());
            for a in check {
                inv.arg(a.as_slice());
            }
        }
        let (at, why): (i64, String) = inv.invoke(c)?;
        match at {
            0 => {}
            -1 => return Ok(AclAnswer::Unavailable),
            i => return Ok(AclAnswer::Refused(n * 300 + i as usize - 1, why)),
        }
    }
    Ok(AclAnswer::Allowed)
}
