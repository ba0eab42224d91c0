//! A caller's deadline for one operation, carried to the dispatcher's dependency calls.
//!
//! Frontends whose protocol has a per-call deadline (gRPC `grpc-timeout`) run the dispatcher future inside
//! [`with_deadline`]; every backend, key-generation and store call in it is then bounded by the smaller of its
//! own configured deadline and the time the caller has left. The operation still ends normally (a miss is
//! `DependencyTimeout`), so it is audited and nothing is cancelled halfway through a mutation.

use std::future::Future;
use std::time::{Duration, Instant};

tokio::task_local! {
    static CALL_DEADLINE: Instant;
}

/// Runs `fut` with `deadline` as the caller's deadline.
pub async fn with_deadline<F: Future>(deadline: Instant, fut: F) -> F::Output {
    CALL_DEADLINE.scope(deadline, fut).await
}

/// `own`, shortened to the time left before the caller's deadline when one is set.
pub fn bound(own: Duration) -> Duration {
    CALL_DEADLINE.try_with(|d| own.min(d.saturating_duration_since(Instant::now()))).unwrap_or(own)
}

/// The caller's deadline, when the current operation runs under one.
pub fn current() -> Option<Instant> {
    CALL_DEADLINE.try_with(|d| *d).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounds_only_inside_the_scope() {
        let own = Duration::from_secs(5);
        assert_eq!(bound(own), own);
        assert!(current().is_none());
        let d = Instant::now() + Duration::from_millis(50);
        with_deadline(d, async {
            assert!(bound(own) <= Duration::from_millis(50));
            assert_eq!(current(), Some(d));
            assert_eq!(bound(Duration::from_millis(1)), Duration::from_millis(1), "a shorter own deadline wins");
        })
        .await;
        let past = Instant::now() - Duration::from_millis(1);
        with_deadline(past, async { assert_eq!(bound(own), Duration::ZERO) }).await;
    }
}
