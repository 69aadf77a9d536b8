//! Redis URLs as they may be logged: passwords masked, whatever the URL looks like.
//!
//! `redis.url` is a single URL or, for a cluster, a comma-separated list of seed URLs, and any of
//! them may carry `user:password@`. Masking parses each URL with a real URL parser, so a password
//! containing `@`, `:` or percent-escapes is cut where Redis cuts it; anything that does not parse
//! as the worker would use it is masked whole rather than printed.

use url::Url;

/// What stands in for a secret.
const MASK: &str = "***";

/// `url` (one URL or a comma-separated seed list) with every password, and anything that could
/// hold one, replaced by `***`. Hosts, ports and database numbers stay readable.
pub fn redis_url(url: &str) -> String {
    url.split(',')
        .map(|item| one(item.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` (typically an error message) with every secret of `url` replaced by `***`: the whole
/// URL items, and each password (or lone user name) both as written and percent-decoded.
pub fn scrub(text: &str, url: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    for item in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        secrets.push(item.to_owned());
        match Url::parse(item) {
            Ok(u) => {
                // A user name alone may be a password written without its colon.
                let secret = u.password().unwrap_or(u.username());
                if !secret.is_empty() {
                    secrets.push(secret.to_owned());
                    let decoded = percent_decode(secret);
                    if decoded != secret {
                        secrets.push(decoded);
                    }
                }
            }
            Err(_) => {
                // What an unparseable item's password may be: everything before its last `@`.
                if let Some((head, _)) = item.rsplit_once('@') {
                    let userinfo = head.split_once("://").map_or(head, |(_, rest)| rest);
                    secrets.push(userinfo.to_owned());
                    if let Some((_, pass)) = userinfo.split_once(':') {
                        secrets.push(pass.to_owned());
                    }
                }
            }
        }
    }
    // Longest first, so a password inside a whole URL is not replaced before the URL is.
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for s in &secrets {
        out = out.replace(s.as_str(), MASK);
    }
    out
}

/// One URL, masked.
fn one(item: &str) -> String {
    let Ok(u) = Url::parse(item) else {
        return unparseable(item);
    };
    // A URL the redis crate would read differently (no host, a path that is not a database
    // number, a fragment) may hold a password cut in the wrong place: mask it whole.
    let Some(host) = u.host_str() else {
        return unparseable(item);
    };
    let db_path =
        u.path().is_empty() || u.path() == "/" || u.path()[1..].chars().all(|c| c.is_ascii_digit());
    if !db_path || u.fragment().is_some() {
        return unparseable(item);
    }
    let userinfo = match (u.username(), u.password()) {
        ("", None) => String::new(),
        ("", Some(_)) => format!(":{MASK}@"),
        (user, Some(_)) => format!("{user}:{MASK}@"),
        // A lone user part is how some write a password (`redis://secret@host`).
        (_, None) => format!("{MASK}@"),
    };
    let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
    // Query parameters (`?password=`, `?user=`) are kept by name only.
    let query = u
        .query_pairs()
        .map(|(k, _)| format!("{k}={MASK}"))
        .collect::<Vec<_>>();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    format!("{}://{userinfo}{host}{port}{}{query}", u.scheme(), u.path())
}

/// Something that is not a usable URL: its scheme when it has a plain one, and the host after
/// the last `@` when that looks like nothing but a host and port.
fn unparseable(item: &str) -> String {
    let scheme = item
        .split_once("://")
        .map(|(s, _)| s)
        .filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
        .map(|s| format!("{s}://"))
        .unwrap_or_default();
    let host = item
        .rsplit_once('@')
        .map(|(_, h)| h)
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .map(|h| format!("@{h}"))
        .unwrap_or_default();
    format!("{scheme}{MASK}{host} (not a valid URL)")
}

/// `%XX` escapes decoded (invalid escapes kept as written).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
