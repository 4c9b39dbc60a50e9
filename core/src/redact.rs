//! Secrets taken out of connection strings before they are shown or logged — the one
//! implementation every broker, store and the relay's `config print` use, in one style:
//! each secret becomes `<redacted>`.
//!
//! What counts as a secret:
//! - the password in a URL's user info (`scheme://user:PASSWORD@host`); the last `@` before the
//!   next URL ends the user info, so a password with an unencoded `/`, `?`, `@` or `,` is still
//!   hidden whole (when unsure where it ends, more is redacted, never less);
//! - a user info without a `:` (`nats://TOKEN@host`, `redis://PASSWORD@host`): NATS tokens and
//!   Redis ACL passwords are written there, so it is hidden whole — except for `postgres://`
//!   and `postgresql://`, whose lone user info is only ever a user name (and an `@` after a `/`
//!   with no `:` before it is a path, not a user info);
//! - the value of a `password`, `pass`, `token` or `secret` parameter, in a URL query or a
//!   keyword/value connection string (`host=db password='a b'`), quoted values included.
//!
//! Several servers in one string (`nats://a:4222,nats://u:p@b:4222`) are each redacted.

use std::ops::Range;

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Parameter names whose value is a secret (compared without case).
const SECRET_PARAMS: &[&str] = &["password", "pass", "token", "secret"];

/// Schemes whose user info without a `:` is a user name, not a secret.
const USER_NAME_SCHEMES: &[&str] = &["postgres", "postgresql"];

/// `text` with every secret in it (see the module docs) replaced by [`REDACTED`].
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for span in secret_spans(text) {
        out.push_str(&text[at..span.start]);
        out.push_str(REDACTED);
        at = span.end;
    }
    out.push_str(&text[at..]);
    out
}

/// The byte ranges of the secrets in `text`, sorted, merged, never empty — for a caller that
/// also wants the secrets themselves (to scrub them out of a driver's error messages).
pub fn secret_spans(text: &str) -> Vec<Range<usize>> {
    let mut spans = userinfo_spans(text);
    spans.extend(param_spans(text));
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for span in spans {
        match merged.last_mut() {
            Some(last) if span.start <= last.end => last.end = last.end.max(span.end),
            _ => merged.push(span),
        }
    }
    merged
}

/// The secret parts of each URL's user info.
fn userinfo_spans(text: &str) -> Vec<Range<usize>> {
    let starts: Vec<(usize, usize)> = text
        .match_indices("://")
        .map(|(i, _)| (scheme_start(text, i), i + 3))
        .collect();
    let mut spans = Vec::new();
    for (n, &(scheme_at, start)) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(text.len(), |&(next, _)| next);
        let segment = &text[start..end];
        let Some(at) = segment.rfind('@') else {
            continue;
        };
        let userinfo = &segment[..at];
        match userinfo.find(':') {
            Some(colon) if colon + 1 < at => spans.push(start + colon + 1..start + at),
            Some(_) => {}
            // A path with an `@` in it, not a user info.
            None if userinfo.is_empty() || userinfo.contains('/') => {}
            None => {
                let scheme = text[scheme_at..start - 3].to_ascii_lowercase();
                if !USER_NAME_SCHEMES.contains(&scheme.as_str()) {
                    spans.push(start..start + at);
                }
            }
        }
    }
    spans
}

/// Where the scheme that ends at `sep` (the index of `://`) begins.
fn scheme_start(text: &str, sep: usize) -> usize {
    text[..sep]
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |i| i + 1)
}

/// The values of secret parameters (`password=...` after `?`, `&`, `;`, a space or the start).
fn param_spans(text: &str) -> Vec<Range<usize>> {
    let lower = text.to_ascii_lowercase();
    let mut spans = Vec::new();
    for key in SECRET_PARAMS {
        let needle = format!("{key}=");
        let mut from = 0;
        while let Some(found) = lower[from..].find(&needle) {
            let key_start = from + found;
            let value_start = key_start + needle.len();
            from = value_start;
            let boundary = text[..key_start]
                .chars()
                .next_back()
                .is_none_or(|c| matches!(c, '?' | '&' | ';') || c.is_whitespace());
            if !boundary {
                continue;
            }
            let value = &text[value_start..];
            let len = if let Some(quoted) = value.strip_prefix('\'') {
                quoted.find('\'').map_or(value.len(), |end| end + 2)
            } else {
                value
                    .find(|c: char| c == '&' || c == '#' || c == ',' || c.is_whitespace())
                    .unwrap_or(value.len())
            };
            if len > 0 {
                spans.push(value_start..value_start + len);
            }
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(url: &str, expect: &str) {
        assert_eq!(redact_url(url), expect, "{url}");
    }

    #[test]
    fn passwords_in_the_user_info_are_hidden() {
        check(
            "postgres://syncra:hunter2@db.example:5432/relay?sslmode=verify-full",
            "postgres://syncra:<redacted>@db.example:5432/relay?sslmode=verify-full",
        );
        check(
            "postgresql://u:p%40ss%2Fw@ep-x-pooler.eu.aws.neon.tech/db",
            "postgresql://u:<redacted>@ep-x-pooler.eu.aws.neon.tech/db",
        );
        check("nats://u:s3cret@h:4222", "nats://u:<redacted>@h:4222");
        check(
            "rediss://:pw@cache:6380/0",
            "rediss://:<redacted>@cache:6380/0",
        );
        // Unencoded `/`, `?`, `@` and `#` inside a password: cut up to the last `@`.
        check(
            "postgres://u:a/b?c@d#e@host/db",
            "postgres://u:<redacted>@host/db",
        );
        check("postgres://u:@host/db", "postgres://u:@host/db");
    }

    #[test]
    fn a_lone_user_info_is_a_secret_except_for_postgres() {
        check("tls://s3cret@h:4222", "tls://<redacted>@h:4222");
        check("nats://tok@h:4222", "nats://<redacted>@h:4222");
        check("redis://aclpass@h:6379", "redis://<redacted>@h:6379");
        check("postgres://u@host/db", "postgres://u@host/db");
        check("PostgreSQL://u@host/db", "PostgreSQL://u@host/db");
        check("https://example.org/path@x", "https://example.org/path@x");
    }

    #[test]
    fn every_server_of_a_list_is_redacted() {
        check(
            "nats://a:p1@h1:4222,nats://h2:4222",
            "nats://a:<redacted>@h1:4222,nats://h2:4222",
        );
        check(
            "nats://u:p@a:4222,nats://u:q@b:4222",
            "nats://u:<redacted>@a:4222,nats://u:<redacted>@b:4222",
        );
        // A comma inside a password does not let its second half out.
        check("nats://u:a,b@h:4222", "nats://u:<redacted>@h:4222");
    }

    #[test]
    fn secret_parameters_are_hidden() {
        check("postgres://host/db?user=u", "postgres://host/db?user=u");
        check(
            "postgres://host/db?user=u&password=hunter2&sslmode=require",
            "postgres://host/db?user=u&password=<redacted>&sslmode=require",
        );
        check(
            "postgres://host/db?PASSWORD=hunter2",
            "postgres://host/db?PASSWORD=<redacted>",
        );
        check(
            "host=db password='a b' user=u",
            "host=db password=<redacted> user=u",
        );
        check(
            "wss://relay/ws?token=abc&x=1",
            "wss://relay/ws?token=<redacted>&x=1",
        );
        // `password=` only counts as a key, not inside another key's name.
        check(
            "postgres://host/db?application_name=nopassword=x",
            "postgres://host/db?application_name=nopassword=x",
        );
        check("not a url", "not a url");
        check("", "");
    }
}
