//! Seeding many keys quickly for the memory scenario. `kmsgate keys create` is one process start (store
//! open, migrations check, root key load) per key: minutes for 10,000. This opens the same configuration once
//! through kmsgate's own assembly (`App::open`) and creates the keys through the dispatcher, so they are
//! exactly what the CLI would have made (audited, on the change feed, material wrapped under the root key).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use kmsgate_core::{CreateKeyRequest, KeyId, KeySpec};

/// Creates AES_256 keys `{prefix}00000` … with `parallel` concurrent creations; returns how many were made.
pub async fn seed_keys(config: &Path, count: usize, prefix: &str, parallel: usize) -> anyhow::Result<usize> {
    let (cfg, _) = kmsgate::config::Config::load(Some(config))?;
    let (app, _) = kmsgate::app::App::open(cfg).await?;
    let app = Arc::new(app);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let (app, next, prefix) = (app.clone(), next.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let caller = app.admin();
            let mut made = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<usize, anyhow::Error>(made);
                }
                let mut req = CreateKeyRequest::new(KeySpec::Aes256);
                let id = format!("{prefix}{i:05}");
                req.id = Some(KeyId::parse(&id).map_err(|e| anyhow::anyhow!("{id}: {}", e.message()))?);
                app.dispatcher
                    .create_key(&caller, req)
                    .await
                    .map_err(|e| anyhow::anyhow!("creating {id}: {}", e.message()))?;
                made += 1;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.context("seeding task failed")??;
    }
    Ok(total)
}
