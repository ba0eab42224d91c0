//! Parsers of the API's value types: durations, globs, prefixed ids, request ids.

use std::time::Duration;

use crate::code::ErrorCode;
use crate::error::ApiError;

/// `^[0-9]+(s|m|h|d|w)$`, else `invalid_duration` naming `field`.
pub fn parse_duration(field: &str, s: &str) -> Result<Duration, ApiError> {
    let bad = || {
        ApiError::new(ErrorCode::InvalidDuration, format!("{field} must match ^[0-9]+(s|m|h|d|w)$"))
            .detail("field", field)
            .detail("value", truncate(s, 64))
    };
    if !s.is_ascii() {
        return Err(bad());
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    if num.is_empty() || num.len() > 12 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

pub fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A compiled path glob: `*` one segment (or part of one), `**` zero or more whole segments, `?` one
/// character other than `/`. Anchored at both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
}

impl Glob {
    pub fn parse(pattern: &str) -> Result<Glob, ApiError> {
        let err = |position: usize, reason: &str| {
            ApiError::new(ErrorCode::InvalidGlob, format!("invalid glob at {position}: {reason}"))
                .detail("pattern", truncate(pattern, 512))
                .detail("position", position)
                .detail("reason", reason)
        };
        if pattern.is_empty() || pattern.len() > 512 {
            return Err(err(0, "a glob must be 1 to 512 characters"));
        }
        // Backtracking matches cost grows with the number of wildcards: bound it.
        if pattern.bytes().filter(|b| *b == b'*').count() > 16 {
            return Err(err(0, "at most 16 * characters"));
        }
        let mut pos = 0;
        for segment in pattern.split('/') {
            if segment.is_empty() {
                return Err(err(pos, "empty segment"));
            }
            if segment.contains("**") && segment != "**" {
                let at = pos + segment.find("**").unwrap_or(0);
                return Err(err(at, "** must be a whole segment"));
            }
            for (i, b) in segment.bytes().enumerate() {
                let ok =
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'=' | b'@' | b'*' | b'?');
                if !ok {
                    return Err(err(pos + i, "character not allowed in a path glob"));
                }
            }
            pos += segment.len() + 1;
        }
        Ok(Glob { pattern: pattern.to_owned() })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    pub fn matches(&self, path: &str) -> bool {
        let pat: Vec<&str> = self.pattern.split('/').collect();
        let segs: Vec<&str> = path.split('/').collect();
        match_segments(&pat, &segs)
    }
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => (0..=segs.len()).any(|skip| match_segments(rest, &segs[skip..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => match_segment(p.as_bytes(), s.as_bytes()) && match_segments(rest, srest),
            None => false,
        },
    }
}

fn match_segment(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|skip| match_segment(rest, &s[skip..])),
        Some((b'?', rest)) => !s.is_empty() && match_segment(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && match_segment(rest, &s[1..]),
    }
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A ULID: 48 bits of milliseconds then 80 random bits, Crockford base32 (26 characters, sortable by time).
pub fn ulid() -> String {
    let ms = u128::try_from(kmsgate_core::Timestamp::now().0.max(0)).unwrap_or(0) & ((1 << 48) - 1);
    let mut rnd = [0u8; 10];
    let _ = aws_lc_rs::rand::fill(&mut rnd);
    let mut v: u128 = ms << 80;
    for (i, b) in rnd.iter().enumerate() {
        v |= u128::from(*b) << (8 * (9 - i));
    }
    (0..26).rev().map(|i| char::from(CROCKFORD[usize::try_from((v >> (5 * i)) & 31).unwrap_or(0)])).collect()
}

/// A prefixed opaque id such as `pol_01J...`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid().to_ascii_lowercase())
}

/// The client's `X-Request-ID` if it matches `[A-Za-z0-9._-]{1,128}`.
pub fn valid_request_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("ttl", "90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("ttl", "2w").unwrap(), Duration::from_secs(1_209_600));
        for bad in ["", "h", "1", "1y", "-1h", "1.5h", " 1h", "1H", "\u{80}", "1\u{e9}"] {
            assert_eq!(parse_duration("ttl", bad).unwrap_err().code, ErrorCode::InvalidDuration, "{bad}");
        }
    }

    #[test]
    fn globs() {
        let g = |p: &str| Glob::parse(p).unwrap();
        assert!(g("app/*/db").matches("app/prod/db"));
        assert!(!g("app/*/db").matches("app/prod/eu/db"));
        assert!(g("app/**").matches("app"));
        assert!(g("app/**").matches("app/a/b/c"));
        assert!(g("app/**/db").matches("app/db"));
        assert!(g("app/**/db").matches("app/x/y/db"));
        assert!(!g("app/**/db").matches("app/x/dbx"));
        assert!(g("db-?").matches("db-1"));
        assert!(!g("db-?").matches("db-12"));
        assert!(g("**").matches("anything/at/all"));
        assert!(g("svc-*").matches("svc-a"));
        assert!(!g("app").matches("app/x"), "anchored");
        let e = Glob::parse("app/a**").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidGlob);
        assert_eq!(e.details["position"], 5);
        assert_eq!(Glob::parse("a//b").unwrap_err().code, ErrorCode::InvalidGlob);
        assert_eq!(Glob::parse("a/b c").unwrap_err().details["position"], 3);
    }

    #[test]
    fn ids() {
        let a = ulid();
        assert_eq!(a.len(), 26);
        assert_ne!(a, ulid());
        assert!(new_id("pol").starts_with("pol_"));
        assert!(valid_request_id("abc-1.2_3"));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
