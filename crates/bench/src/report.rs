//! The report: machine, scenarios, ratios to the baselines, targets (PASS/MISS), scenarios not available in
//! this build. Printed as a table and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::hist::{Summary, fmt_us};
use crate::load::{LoadResult, LoadSpec};

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    /// 1-, 5- and 15-minute load averages when the run started and ended.
    pub load_start: [f64; 3],
    pub load_end: [f64; 3],
    /// `release` or `debug`: debug numbers are not comparable.
    pub build: String,
    pub kernel: String,
}

fn load_avg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|x| x.parse().unwrap_or(f64::NAN));
    [it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN)]
}

impl Machine {
    pub fn now() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let load = load_avg();
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            mem_total_mib,
            load_start: load,
            load_end: load,
            build: if cfg!(debug_assertions) { "debug" } else { "release" }.to_owned(),
            kernel,
        }
    }

    pub fn finish(&mut self) {
        self.load_end = load_avg();
    }
}

/// One measured scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scenario {
    /// Stable id, e.g. `xks-encrypt-software-64c`.
    pub name: String,
    pub description: String,
    /// `xks`, `bare-hyper` or `backend`.
    pub kind: String,
    pub connections: usize,
    /// Open loop: the scheduled rate (requests per second).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    pub transport: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub warmup_ok: u64,
    pub warmup_errors: BTreeMap<String, u64>,
    pub unsent: u64,
    /// Successful requests (or backend iterations) per second.
    pub per_sec: f64,
    /// HSM operations per second, where a request costs a known number of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsm_ops_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Summary>,
    /// Open loop: service time from the actual send, beside the latency from the intended send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_time: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_peak_rss_kib: Option<u64>,
    /// Share of the machine's CPU that processes outside the benchmark used during the scenario: above a few
    /// per cent, the numbers are depressed by other work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreign_cpu: Option<f64>,
    /// The baseline this is compared with, and the ratio (`per_sec` or HSM ops over the baseline's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl Scenario {
    pub fn from_load(
        name: &str,
        description: &str,
        kind: &str,
        transport: &str,
        r: &LoadResult,
        spec: &LoadSpec,
    ) -> Scenario {
        let rate = spec.rate;
        Scenario {
            name: name.to_owned(),
            description: description.to_owned(),
            kind: kind.to_owned(),
            connections: spec.connections,
            rate,
            transport: transport.to_owned(),
            duration_s: r.window.as_secs_f64(),
            warmup_s: spec.warmup.as_secs_f64(),
            ok: r.ok,
            errors: r.errors.clone(),
            warmup_ok: r.warmup_ok,
            warmup_errors: r.warmup_errors.clone(),
            unsent: r.unsent,
            per_sec: r.ok_per_sec(),
            latency: (r.ok > 0).then(|| r.latency.summary()),
            service_time: (rate.is_some() && r.ok > 0).then(|| r.service.summary()),
            ..Scenario::default()
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A target of the issue, judged on this run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    /// `PASS`, `MISS` or `NOT RUN`.
    pub status: String,
}

/// A scenario this build cannot run, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unavailable {
    pub scenario: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    pub scenarios: Vec<Scenario>,
    pub targets: Vec<Target>,
    pub unavailable: Vec<Unavailable>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(machine: Machine) -> Report {
        Report {
            tool: format!("kmsgate-bench {}", env!("CARGO_PKG_VERSION")),
            started_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine,
            scenarios: Vec::new(),
            targets: Vec::new(),
            unavailable: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn scenario(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| s.name == name)
    }

    /// Scenarios whose every measured request failed: the run proves nothing about them.
    pub fn all_failed(&self) -> Vec<&Scenario> {
        self.scenarios.iter().filter(|s| s.ok == 0).collect()
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "machine: {} × {} ({} MiB), load {:.2} → {:.2}, {} build",
            m.nproc, m.cpu_model, m.mem_total_mib, m.load_start[0], m.load_end[0], m.build
        );
        let _ = writeln!(
            out,
            "\n{:<36} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7}  vs",
            "scenario", "conns", "ok/s", "p50", "p90", "p99", "p99.9", "max", "errors", "others", "ratio"
        );
        for s in &self.scenarios {
            let l = s.latency.unwrap_or_default();
            let lat = |v: u64| if s.latency.is_some() { fmt_us(v) } else { "-".to_owned() };
            let conns = if s.kind == "backend" { format!("{}t", s.connections) } else { s.connections.to_string() };
            let _ = writeln!(
                out,
                "{:<36} {:>5} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7}  {}",
                s.name,
                conns,
                s.hsm_ops_per_sec.filter(|_| s.kind == "backend").unwrap_or(s.per_sec),
                lat(l.p50_us),
                lat(l.p90_us),
                lat(l.p99_us),
                lat(l.p999_us),
                lat(l.max_us),
                s.error_count(),
                s.foreign_cpu.map_or("-".to_owned(), |f| format!("{:.0}%", f * 100.0)),
                s.ratio.map_or("-".to_owned(), |r| format!("{:.0}%", r * 100.0)),
                s.baseline.as_deref().unwrap_or(""),
            );
        }
        let _ = writeln!(
            out,
            "(others: share of the machine's CPU used by processes outside the benchmark during the scenario)"
        );
        let with_errors: Vec<_> =
            self.scenarios.iter().filter(|s| !s.errors.is_empty() || !s.warmup_errors.is_empty()).collect();
        if !with_errors.is_empty() {
            let _ = writeln!(out, "\nerrors by wire code:");
            for s in with_errors {
                for (k, v) in &s.errors {
                    let _ = writeln!(out, "  {:<36} {v:>8}  {k}", s.name);
                }
                for (k, v) in &s.warmup_errors {
                    let _ = writeln!(out, "  {:<36} {v:>8}  {k} (warm-up)", s.name);
                }
            }
        }
        let open: Vec<_> = self.scenarios.iter().filter(|s| s.rate.is_some()).collect();
        for s in open {
            let _ = writeln!(
                out,
                "\n{}: open loop at {:.0}/s; latency from the intended send time; service time p99 {}; {} requests unsent",
                s.name,
                s.rate.unwrap_or_default(),
                s.service_time.map_or("-".to_owned(), |t| fmt_us(t.p99_us)),
                s.unsent
            );
        }
        for s in self.scenarios.iter().filter(|s| s.server_peak_rss_kib.is_some()) {
            let _ = writeln!(
                out,
                "{}: server RSS {} MiB at the end, peak {} MiB",
                s.name,
                s.server_rss_kib.unwrap_or_default() / 1024,
                s.server_peak_rss_kib.unwrap_or_default() / 1024
            );
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets:");
            for t in &self.targets {
                let _ = writeln!(out, "  {:<8} {}: {} (measured: {})", t.status, t.name, t.goal, t.measured);
            }
        }
        if !self.unavailable.is_empty() {
            let _ = writeln!(out, "\nnot available in this build:");
            for u in &self.unavailable {
                let _ = writeln!(out, "  {}: {}", u.scenario, u.reason);
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn table_shows_ratios_errors_and_targets() {
        let mut r = Report::new(Machine::now());
        r.scenarios.push(Scenario {
            name: "xks-encrypt-software-64c".into(),
            kind: "xks".into(),
            connections: 64,
            ok: 1000,
            per_sec: 100.0,
            latency: Some(Summary { count: 1000, p99_us: 4_200, ..Summary::default() }),
            errors: BTreeMap::from([("401 AuthenticationFailedException".to_owned(), 3)]),
            baseline: Some("bare-hyper-64c".into()),
            ratio: Some(0.625),
            ..Scenario::default()
        });
        r.targets.push(Target { name: "t".into(), goal: "g".into(), measured: "m".into(), status: "PASS".into() });
        r.unavailable.push(Unavailable { scenario: "alibaba".into(), reason: "no frontend".into() });
        let t = r.table();
        assert!(t.contains("62%"), "{t}");
        assert!(t.contains("4.20ms"), "{t}");
        assert!(t.contains("401 AuthenticationFailedException"), "{t}");
        assert!(t.contains("PASS"), "{t}");
        assert!(t.contains("not available in this build"), "{t}");
        assert!(r.all_failed().is_empty());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenarios"][0]["ratio"], 0.625);
    }
}
