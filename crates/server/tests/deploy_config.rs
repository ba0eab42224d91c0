//! The configuration files the Helm chart renders (scripts/check-deploy keeps one per values file in
//! `$KMSGATE_TEST_CHART_CONFIGS`) load with kmsgate's own loader: no unknown key, every cross-check passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kmsgate::config::{AuditDestination, Config};

#[test]
fn the_charts_rendered_configurations_load() {
    let dir = std::env::var("KMSGATE_TEST_CHART_CONFIGS")
        .unwrap_or_else(|_| panic!("KMSGATE_TEST_CHART_CONFIGS is not set: run the tests through ./scripts/test"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e} (scripts/check-deploy renders the chart into it)"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let names: Vec<_> = files.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"default".to_owned()) && names.contains(&"ha-values".to_owned()), "{names:?}");
    for f in &files {
        let (c, _) = Config::load(Some(f)).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
        assert_eq!(c.admin.bind.to_string(), "0.0.0.0:8081", "{}", f.display());
        assert_eq!(c.server.bind.to_string(), "0.0.0.0:8080", "{}", f.display());
        assert_eq!(c.data_dir.to_str(), Some("/var/lib/kmsgate"));
        assert_eq!(c.audit.destination, AuditDestination::Stdout);
        assert!(c.kek_file().starts_with("/var/run/secrets/kmsgate/kek"));
    }
    let (ha, _) = Config::load(Some(&files[names.iter().position(|n| n == "ha-values").unwrap()])).unwrap();
    assert_eq!(ha.backend.default, "hsm-a");
    assert_eq!(ha.backend.pkcs11.len(), 1);
    assert!(ha.server.tls.as_ref().is_some_and(|t| t.client_ca.is_some()));
    assert!(ha.store_url().starts_with("postgres://"));
}
