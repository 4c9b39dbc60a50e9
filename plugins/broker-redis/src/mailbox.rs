//! `[mailbox] kind = "redis"`: sealed deliveries for recipients who are not connected, in Redis
//! Streams (durable structures, not pub/sub), shared by every node of a cluster.
//!
//! Per recipient: a stream `syncra.mb.{<user id>}` whose entry ids are `<n>-0`, `n` counting up
//! per recipient (entry fields `d`: the sealed delivery, `t`: when it was stored, ms), and a hash
//! `syncra.mbu.{<user id>}` with the recipient's `entries`, `bytes` and `next` id. The braces
//! keep both keys of a recipient in one Redis Cluster slot. Every change is one Lua script, so a
//! put checks the quota, takes the next id and appends atomically, and ids are never reused.
//!
//! Durability is Redis's: "stored" survives the relay being killed at once, and survives Redis
//! restarting only with `appendonly yes` and `appendfsync always` (docs/SCALING.md).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};
use syncra_core::error::PluginError;
use syncra_core::mailbox::{Mailbox, MailboxEntry, MailboxError, MailboxLimits, PutOutcome};
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::{Health, UserId};
use tokio::sync::Mutex;

use syncra_core::redact::redact_url;

use crate::{KIND, RedisConfig};

/// Appends if the quota allows: returns the new id, or 0 when full.
const PUT: &str = r#"
local entries = tonumber(redis.call('HGET', KEYS[2], 'entries') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
local size = string.len(ARGV[1])
if entries >= tonumber(ARGV[3]) or bytes + size > tonumber(ARGV[4]) then
  return 0
end
local id = redis.call('HINCRBY', KEYS[2], 'next', 1)
redis.call('XADD', KEYS[1], id .. '-0', 'd', ARGV[1], 't', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'entries', 1)
redis.call('HINCRBY', KEYS[2], 'bytes', size)
return id
"#;

/// Deletes entries with id ≤ ARGV[1] (or stored before ARGV[2] when ARGV[1] is '-'); returns
/// how many, releasing their usage.
const DELETE: &str = r#"
local gone, size = 0, 0
local entries
if ARGV[1] ~= '-' then
  entries = redis.call('XRANGE', KEYS[1], '-', ARGV[1] .. '-0')
else
  entries = redis.call('XRANGE', KEYS[1], '-', '+')
end
for _, e in ipairs(entries) do
  local fields = e[2]
  local d, t = nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'd' then d = fields[i + 1] end
    if fields[i] == 't' then t = tonumber(fields[i + 1]) end
  end
  -- An entry without d or t was not written by PUT (another client of the server appended it):
  -- removed whenever it is met, and not counted against the usage it never added to.
  local ours = d ~= nil and t ~= nil and string.sub(e[1], -2) == '-0'
  if ARGV[1] ~= '-' or not ours or t < tonumber(ARGV[2]) then
    redis.call('XDEL', KEYS[1], e[1])
    if ours then
      gone = gone + 1
      size = size + string.len(d)
    end
  end
end
if gone > 0 then
  redis.call('HINCRBY', KEYS[2], 'entries', -gone)
  redis.call('HINCRBY', KEYS[2], 'bytes', -size)
end
return gone
"#;

/// A [`Mailbox`] in Redis Streams.
pub struct RedisMailbox {
    client: Client,
    connection: Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
    location: String,
    limits: MailboxLimits,
}

impl std::fmt::Debug for RedisMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMailbox")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

fn stream_key(user: &UserId) -> String {
    format!("syncra.mb.{{{user}}}")
}

fn usage_key(user: &UserId) -> String {
    format!("syncra.mbu.{{{user}}}")
}

impl RedisMailbox {
    /// Connects (once, at start: a wrong address fails the start).
    pub async fn connect(
        config: &RedisConfig,
        limits: MailboxLimits,
    ) -> Result<Self, MailboxError> {
        let location = redact_url(&config.url);
        let client = Client::open(config.url.as_str()).map_err(|e| {
            MailboxError::Unavailable(format!("{location} is not a Redis URL: {e}"))
        })?;
        crate::install_tls_provider(&client);
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(config.command_timeout_ms)));
        let mailbox = RedisMailbox {
            client,
            connection: Mutex::new(None),
            config: connection_config,
            location,
            limits,
        };
        mailbox.connection().await?;
        Ok(mailbox)
    }

    fn unavailable(&self, action: &str, e: impl std::fmt::Display) -> MailboxError {
        MailboxError::Unavailable(format!(
            "mailbox at {}: {action} failed: {e}",
            self.location
        ))
    }

    /// The connection, made again after a failure.
    async fn connection(&self) -> Result<MultiplexedConnection, MailboxError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(|e| self.unavailable("connecting", e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets a connection that failed, so the next call reconnects.
    async fn forget(&self) {
        *self.connection.lock().await = None;
    }

    /// Runs one of the scripts on the recipient's two keys (`EVAL`: the scripts are short, and
    /// this needs no script cache).
    async fn run<T: redis::FromRedisValue>(
        &self,
        action: &str,
        script: &str,
        keys: [&str; 2],
        args: &[String],
    ) -> Result<T, MailboxError> {
        let mut c = self.connection().await?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(2).arg(keys[0]).arg(keys[1]);
        for a in args {
            cmd.arg(a.as_str());
        }
        match cmd.query_async(&mut c).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.forget().await;
                Err(self.unavailable(action, e))
            }
        }
    }
}

#[async_trait]
impl Mailbox for RedisMailbox {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn put(
        &self,
        recipient: &UserId,
        delivery: Bytes,
        now_ms: u64,
    ) -> Result<PutOutcome, MailboxError> {
        let mut c = self.connection().await?;
        let id: u64 = match redis::cmd("EVAL")
            .arg(PUT)
            .arg(2)
            .arg(stream_key(recipient))
            .arg(usage_key(recipient))
            .arg(delivery.as_ref())
            .arg(now_ms)
            .arg(self.limits.max_entries)
            .arg(self.limits.max_bytes)
            .query_async(&mut c)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                self.forget().await;
                return Err(self.unavailable("storing a delivery", e));
            }
        };
        Ok(if id == 0 {
            PutOutcome::Full
        } else {
            PutOutcome::Stored(id)
        })
    }

    async fn take(
        &self,
        recipient: &UserId,
        after: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<MailboxEntry>, MailboxError> {
        let oldest = now_ms.saturating_sub(self.limits.ttl_ms);
        let mut c = self.connection().await?;
        let reply: Value = match redis::cmd("XRANGE")
            .arg(stream_key(recipient))
            .arg(format!("({after}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut c)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.forget().await;
                return Err(self.unavailable("reading a mailbox", e));
            }
        };
        let corrupt = |why: &str| MailboxError::Corrupt(format!("{}: {why}", self.location));
        let Value::Array(items) = reply else {
            return Err(corrupt("XRANGE did not answer a list"));
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Value::Array(parts) = item else {
                return Err(corrupt("an entry is not a list"));
            };
            let [Value::BulkString(id), Value::Array(fields)] = parts.as_slice() else {
                return Err(corrupt("an entry is not [id, fields]"));
            };
            // An entry this plugin did not write (an id not `<n>-0`, no `d` or `t`) was appended
            // by another client of the server: skipped, never a failure of the whole read. (The
            // relay also refuses any entry it did not MAC: host-relay/src/sealed_mailbox.rs.)
            let Some(id) = std::str::from_utf8(id)
                .ok()
                .and_then(|s| s.strip_suffix("-0"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let (mut d, mut t) = (None, None);
            for pair in fields.chunks(2) {
                if let [Value::BulkString(k), Value::BulkString(v)] = pair {
                    match k.as_slice() {
                        b"d" => d = Some(Bytes::copy_from_slice(v)),
                        b"t" => t = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()),
                        _ => {}
                    }
                }
            }
            let (Some(delivery), Some(stored_at_ms)) = (d, t) else {
                continue;
            };
            if stored_at_ms >= oldest {
                out.push(MailboxEntry {
                    id,
                    stored_at_ms,
                    delivery,
                });
            }
        }
        Ok(out)
    }

    async fn ack(&self, recipient: &UserId, up_to: u64) -> Result<(), MailboxError> {
        let (stream, usage) = (stream_key(recipient), usage_key(recipient));
        let _: u64 = self
            .run(
                "acknowledging",
                DELETE,
                [&stream, &usage],
                &[up_to.min(u64::MAX - 1).to_string(), "0".into()],
            )
            .await?;
        Ok(())
    }

    async fn clear(&self, recipient: &UserId) -> Result<u64, MailboxError> {
        let (stream, usage) = (stream_key(recipient), usage_key(recipient));
        self.run(
            "emptying a mailbox",
            DELETE,
            [&stream, &usage],
            &[(u64::MAX - 1).to_string(), "0".into()],
        )
        .await
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError> {
        let cutoff = now_ms.saturating_sub(self.limits.ttl_ms);
        let mut c = self.connection().await?;
        let mut cursor: u64 = 0;
        let mut total = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = match redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("syncra.mb.{*}")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await
            {
                Ok(v) => v,
                Err(e) => {
                    self.forget().await;
                    return Err(self.unavailable("purging expired entries", e));
                }
            };
            for key in keys {
                let usage = key.replacen("syncra.mb.", "syncra.mbu.", 1);
                let gone: u64 = self
                    .run(
                        "purging expired entries",
                        DELETE,
                        [&key, &usage],
                        &["-".into(), cutoff.to_string()],
                    )
                    .await?;
                total += gone;
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    async fn health(&self) -> Health {
        match self.connection().await {
            Err(e) => Health::Down(e.to_string()),
            Ok(mut c) => match redis::cmd("PING").query_async::<String>(&mut c).await {
                Ok(_) => Health::Up,
                Err(e) => {
                    self.forget().await;
                    Health::Down(self.unavailable("PING", e).to_string())
                }
            },
        }
    }
}

/// Registers mailbox kind `"redis"` (the same settings as `[broker] kind = "redis"`).
pub fn register(kinds: &mut Kinds<Arc<dyn Mailbox>, MailboxLimits>) -> Result<(), PluginError> {
    kinds.register(KIND, |config, limits| async move {
        let config: RedisConfig = typed_config("mailbox", KIND, config)?;
        let mailbox =
            RedisMailbox::connect(&config, limits)
                .await
                .map_err(|e| PluginError::Start {
                    category: "mailbox",
                    kind: KIND.to_owned(),
                    message: e.to_string(),
                })?;
        Ok(Arc::new(mailbox) as Arc<dyn Mailbox>)
    })
}
