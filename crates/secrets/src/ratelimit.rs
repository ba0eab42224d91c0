//! Token buckets per (identity, category) with the contract's per-minute defaults; per client IP while
//! unauthenticated. Buckets are per process: with several replicas behind a balancer each enforces the limit
//! on the requests it sees.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The rate-limit categories phase 1 uses, with their per-minute defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    Read,
    Write,
    Delete,
    List,
    BatchRead,
    PolicyOps,
    PolicyTest,
    IdentityRead,
    Whoami,
    /// Requests without a valid token (per client IP).
    Unauthenticated,
}

impl Category {
    pub const ALL: &'static [Category] = &[
        Category::Read,
        Category::Write,
        Category::Delete,
        Category::List,
        Category::BatchRead,
        Category::PolicyOps,
        Category::PolicyTest,
        Category::IdentityRead,
        Category::Whoami,
        Category::Unauthenticated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Read => "read",
            Category::Write => "write",
            Category::Delete => "delete",
            Category::List => "list",
            Category::BatchRead => "batch_read",
            Category::PolicyOps => "policy_ops",
            Category::PolicyTest => "policy_test",
            Category::IdentityRead => "identity_read",
            Category::Whoami => "whoami",
            Category::Unauthenticated => "unauthenticated",
        }
    }

    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// The contract's per-minute default (unauthenticated traffic gets the whoami budget).
    pub fn default_per_minute(self) -> u32 {
        match self {
            Category::Read => 1000,
            Category::Write | Category::Delete | Category::List | Category::BatchRead => 100,
            Category::PolicyOps => 50,
            Category::PolicyTest => 200,
            Category::IdentityRead => 100,
            Category::Whoami | Category::Unauthenticated => 300,
        }
    }
}

/// What the `X-RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub category: Category,
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds at which the bucket is full again.
    pub reset: i64,
    /// Set when the request was refused: how long until one token is available.
    pub retry_after: Option<Duration>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<(String, Category), Bucket>>,
}

impl Limiter {
    /// Takes one token from the bucket of (`who`, `category`) holding `per_minute` tokens.
    pub fn take(&self, who: &str, category: Category, per_minute: u32) -> RateInfo {
        let now = Instant::now();
        let cap = f64::from(per_minute.max(1));
        let rate = cap / 60.0;
        let mut map = match self.buckets.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() > 100_000 {
            // Idle buckets are full anyway: forgetting them changes nothing.
            map.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(60));
        }
        let b = map.entry((who.to_owned(), category)).or_insert(Bucket { tokens: cap, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(cap);
        b.at = now;
        let retry_after = if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64(((1.0 - b.tokens) / rate).max(0.001)))
        };
        let full_in = ((cap - b.tokens) / rate).ceil();
        let unix = kmsgate_core::Timestamp::now().0 / 1000;
        RateInfo {
            category,
            limit: per_minute,
            remaining: b.tokens.floor().max(0.0) as u32,
            reset: unix + full_in as i64,
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refuse_after_the_limit_and_are_separate() {
        let l = Limiter::default();
        for i in 0..5 {
            let r = l.take("a", Category::Write, 5);
            assert_eq!((r.remaining, r.retry_after), (4 - i, None));
        }
        let r = l.take("a", Category::Write, 5);
        assert!(r.retry_after.is_some());
        assert!(r.retry_after.unwrap() <= Duration::from_secs(12));
        assert!(l.take("a", Category::Read, 5).retry_after.is_none(), "other category");
        assert!(l.take("b", Category::Write, 5).retry_after.is_none(), "other identity");
        assert_eq!(Category::Read.default_per_minute(), 1000);
        assert_eq!(Category::parse("policy_test"), Some(Category::PolicyTest));
    }
}
