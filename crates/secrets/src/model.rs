//! The access model's records (core documents) and the policy engine: rules over path globs with
//! permissions and MFA / IP / time-window conditions, bindings to identities and groups, deny by default.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::code::ErrorCode;
use crate::error::ApiError;
use crate::values::{Glob, parse_duration, truncate};

pub const KIND_SIGNING: &str = "secrets.signing";
pub const KIND_TENANT: &str = "secrets.tenant";
pub const KIND_IDENTITY: &str = "secrets.identity";
pub const KIND_TOKEN: &str = "secrets.token";
pub const KIND_POLICY: &str = "secrets.policy";
pub const KIND_POLICY_NAME: &str = "secrets.policy-name";
pub const KIND_BINDING: &str = "secrets.binding";
pub const KIND_BINDING_KEY: &str = "secrets.binding-key";
/// Installation-wide switches (`maintenance`: `{"enabled": bool}`).
pub const KIND_SETTINGS: &str = "secrets.settings";
pub const MAINTENANCE_ID: &str = "maintenance";

/// The one partner of an installation (partner → tenant → identity).
pub const PARTNER: &str = "default";

/// Role of tenant administrators: admin routes and every permission in their tenant.
pub const ROLE_ADMIN: &str = "admin";
/// Role of partner administrators: tenants, and any tenant of the partner.
pub const ROLE_PARTNER_ADMIN: &str = "partner_admin";

pub const PERMISSIONS: &[&str] = &["read", "write", "delete", "list", "rotate", "admin"];
pub const IDENTITY_TYPES: &[&str] = &["user", "service_account", "group"];
pub const SECRET_TYPES: &[&str] = &["kv", "json", "certificate", "ssh_key", "api_key"];

/// Per-tenant settings beside core's tenant row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantDoc {
    pub tenant_id: String,
    pub name: String,
    /// Soft-delete retention, a duration string.
    pub retention: String,
    #[serde(default)]
    pub quotas: Quotas,
    /// Per-minute limits by category, overriding the defaults.
    #[serde(default)]
    pub rate_limits: serde_json::Map<String, Value>,
    pub created_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityDoc {
    pub identity_type: String,
    pub identity_id: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub created_at: String,
}

impl IdentityDoc {
    pub fn doc_id(tenant: &str, typ: &str, id: &str) -> String {
        format!("{tenant}/{typ}/{id}")
    }
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDoc {
    pub token_id: String,
    pub tenant: String,
    pub name: String,
    pub identity_type: String,
    pub identity_id: String,
    pub scopes: Vec<String>,
    pub created_at: String,
    pub expires_at: String,
    pub created_by: String,
    #[serde(default)]
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDoc {
    pub id: String,
    pub tenant: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub scope: String,
    pub rules: Vec<Rule>,
    pub is_active: bool,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub path_pattern: String,
    pub permissions: Vec<String>,
    #[serde(default)]
    pub conditions: Conditions,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_ranges: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_mfa: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfa_max_age: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_window: Option<TimeWindow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    #[serde(default)]
    pub days: Vec<String>,
    pub start: String,
    pub end: String,
    #[serde(default = "utc")]
    pub timezone: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingDoc {
    pub id: String,
    pub tenant: String,
    pub policy_id: String,
    pub identity_type: String,
    pub identity_id: String,
    #[serde(default)]
    pub expires_at: Option<String>,
    pub created_at: String,
}

fn invalid_policy(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidPolicy, message)
}

const DAYS: &[&str] = &["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Checks rules: non-empty, known permissions, valid globs, CIDRs, durations, windows and time zones.
pub fn validate_rules(rules: &[Rule]) -> Result<(), ApiError> {
    if rules.is_empty() {
        return Err(invalid_policy("a policy needs at least one rule"));
    }
    if rules.len() > 100 {
        return Err(invalid_policy("a policy has at most 100 rules"));
    }
    for (i, r) in rules.iter().enumerate() {
        Glob::parse(&r.path_pattern)?;
        if r.permissions.is_empty() {
            return Err(invalid_policy(format!("rules[{i}].permissions is empty")).detail("rule", i));
        }
        for p in &r.permissions {
            if !PERMISSIONS.contains(&p.as_str()) {
                return Err(invalid_policy(format!("rules[{i}]: unknown permission {:?}", truncate(p, 32)))
                    .detail("rule", i)
                    .detail("permission", truncate(p, 32)));
            }
        }
        for c in &r.conditions.ip_ranges {
            Cidr::parse(c).ok_or_else(|| {
                invalid_policy(format!("rules[{i}]: invalid CIDR {:?}", truncate(c, 64))).detail("rule", i)
            })?;
        }
        if let Some(age) = &r.conditions.mfa_max_age {
            parse_duration(&format!("rules[{i}].conditions.mfa_max_age"), age)?;
        }
        if let Some(w) = &r.conditions.time_window {
            for d in &w.days {
                if !DAYS.contains(&d.to_ascii_lowercase().as_str()) {
                    return Err(invalid_policy(format!("rules[{i}]: unknown day {:?}", truncate(d, 16))));
                }
            }
            if clock_minutes(&w.start).is_none() || clock_minutes(&w.end).is_none() {
                return Err(invalid_policy(format!("rules[{i}]: start and end are HH:MM")));
            }
            if tz_offset_minutes(&w.timezone).is_none() {
                return Err(invalid_policy(format!(
                    "rules[{i}]: unsupported time zone {:?} (use UTC or an offset such as +02:00)",
                    truncate(&w.timezone, 64)
                )));
            }
        }
    }
    Ok(())
}

fn clock_minutes(s: &str) -> Option<i64> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=23).contains(&h) && (0..=59).contains(&m)).then_some(h * 60 + m)
}

/// `UTC`, `Z`, or a fixed offset `+HH:MM` / `-HH:MM`. IANA zone names would need a time-zone database.
fn tz_offset_minutes(s: &str) -> Option<i64> {
    if s.eq_ignore_ascii_case("utc") || s == "Z" || s == "Etc/UTC" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=14).contains(&h) && (0..=59).contains(&m) && h.to_string().len() <= 2).then_some(sign * (h * 60 + m))
}

#[derive(Debug, Clone, Copy)]
struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { addr, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.bits == 0 { 0 } else { u32::MAX << (32 - u32::from(self.bits)) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.bits == 0 { 0 } else { u128::MAX << (128 - u32::from(self.bits)) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// What a condition check sees about the request.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub ip: Option<IpAddr>,
    /// Unix seconds.
    pub mfa_verified_at: Option<i64>,
    /// Unix seconds.
    pub at: i64,
}

/// The outcome of evaluating policies.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// `None` when allowed; else `access_denied` or the failed condition's code.
    pub code: Option<ErrorCode>,
    pub condition: Option<&'static str>,
    pub matched_policy: Option<String>,
    pub matched_rule: Option<usize>,
}

impl Decision {
    pub fn into_result(self) -> Result<(), ApiError> {
        match self.code {
            None => Ok(()),
            Some(ErrorCode::AccessDenied) => {
                Err(ApiError::new(ErrorCode::AccessDenied, "no policy rule grants this permission on this path"))
            }
            Some(code) => {
                let condition = self.condition.unwrap_or("");
                let mut e = ApiError::new(code, format!("a policy condition failed: {condition}"))
                    .detail("condition", condition);
                if let Some(p) = self.matched_policy {
                    e = e.detail("policy_id", p);
                }
                Err(e)
            }
        }
    }
}

/// Evaluates `policies` (already those bound to the identity or its groups) for `permission` on `path`.
/// Deny by default; a rule with the `admin` permission grants every permission.
pub fn evaluate(policies: &[&PolicyDoc], path: &str, permission: &str, ctx: &RequestContext) -> Decision {
    // (order of the failed condition: 0 mfa, 1 ip, 2 time; policy id; rule index)
    let mut failure: Option<(u8, &'static str, ErrorCode, String, usize)> = None;
    for p in policies.iter().filter(|p| p.is_active) {
        for (i, r) in p.rules.iter().enumerate() {
            if !r.permissions.iter().any(|x| x == permission || x == "admin") {
                continue;
            }
            let Ok(glob) = Glob::parse(&r.path_pattern) else { continue };
            if !glob.matches(path) {
                continue;
            }
            match failed_condition(&r.conditions, ctx) {
                None => {
                    return Decision {
                        allowed: true,
                        code: None,
                        condition: None,
                        matched_policy: Some(p.id.clone()),
                        matched_rule: Some(i),
                    };
                }
                Some((order, name, code)) => {
                    if failure.as_ref().is_none_or(|f| order < f.0) {
                        failure = Some((order, name, code, p.id.clone(), i));
                    }
                }
            }
        }
    }
    match failure {
        Some((_, name, code, policy, rule)) => Decision {
            allowed: false,
            code: Some(code),
            condition: Some(name),
            matched_policy: Some(policy),
            matched_rule: Some(rule),
        },
        None => Decision {
            allowed: false,
            code: Some(ErrorCode::AccessDenied),
            condition: None,
            matched_policy: None,
            matched_rule: None,
        },
    }
}

fn failed_condition(c: &Conditions, ctx: &RequestContext) -> Option<(u8, &'static str, ErrorCode)> {
    if c.require_mfa || c.mfa_max_age.is_some() {
        let max_age = c.mfa_max_age.as_deref().and_then(|a| parse_duration("mfa_max_age", a).ok());
        let ok = match (ctx.mfa_verified_at, max_age) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(t), Some(age)) => ctx.at.saturating_sub(t) <= i64::try_from(age.as_secs()).unwrap_or(i64::MAX),
        };
        if !ok {
            return Some((0, "mfa", ErrorCode::MfaRequired));
        }
    }
    if !c.ip_ranges.is_empty() {
        let ok = ctx.ip.is_some_and(|ip| c.ip_ranges.iter().filter_map(|r| Cidr::parse(r)).any(|r| r.contains(ip)));
        if !ok {
            return Some((1, "ip", ErrorCode::IpNotAllowed));
        }
    }
    if let Some(w) = &c.time_window
        && !in_window(w, ctx.at)
    {
        return Some((2, "time_window", ErrorCode::TimeWindowViolation));
    }
    None
}

fn in_window(w: &TimeWindow, at: i64) -> bool {
    let (Some(start), Some(end), Some(offset)) =
        (clock_minutes(&w.start), clock_minutes(&w.end), tz_offset_minutes(&w.timezone))
    else {
        return false;
    };
    let local = at + offset * 60;
    let minute = local.rem_euclid(86_400) / 60;
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let day = DAYS[usize::try_from((local.div_euclid(86_400) + 3).rem_euclid(7)).unwrap_or(0)];
    if !w.days.is_empty() && !w.days.iter().any(|d| d.eq_ignore_ascii_case(day)) {
        return false;
    }
    if start <= end { (start..end).contains(&minute) } else { minute >= start || minute < end }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: Vec<Rule>) -> PolicyDoc {
        PolicyDoc {
            id: "pol_1".into(),
            tenant: "t".into(),
            name: "p".into(),
            description: String::new(),
            scope: String::new(),
            rules,
            is_active: true,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    fn rule(pattern: &str, perms: &[&str], conditions: Conditions) -> Rule {
        Rule { path_pattern: pattern.into(), permissions: perms.iter().map(|s| (*s).to_owned()).collect(), conditions }
    }

    // 2026-11-23 was a Monday; 10:00 UTC.
    const MONDAY_10: i64 = 1_795_428_000;

    #[test]
    fn deny_by_default_and_conditions_in_order() {
        let ctx = RequestContext { ip: Some("10.0.0.5".parse().unwrap()), mfa_verified_at: None, at: MONDAY_10 };
        let p = policy(vec![rule("app/**", &["read"], Conditions::default())]);
        assert!(evaluate(&[&p], "app/db", "read", &ctx).allowed);
        assert_eq!(evaluate(&[&p], "app/db", "write", &ctx).code, Some(ErrorCode::AccessDenied));
        assert_eq!(evaluate(&[&p], "other", "read", &ctx).code, Some(ErrorCode::AccessDenied));
        assert_eq!(evaluate(&[], "app/db", "read", &ctx).code, Some(ErrorCode::AccessDenied));

        let all = Conditions {
            ip_ranges: vec!["192.168.0.0/16".into()],
            require_mfa: true,
            mfa_max_age: None,
            time_window: Some(TimeWindow {
                days: vec!["sat".into()],
                start: "09:00".into(),
                end: "17:00".into(),
                timezone: "UTC".into(),
            }),
        };
        let p = policy(vec![rule("app/*", &["read"], all)]);
        let d = evaluate(&[&p], "app/db", "read", &ctx);
        assert_eq!((d.code, d.condition), (Some(ErrorCode::MfaRequired), Some("mfa")));
        let ctx2 = RequestContext { mfa_verified_at: Some(MONDAY_10 - 60), ..ctx.clone() };
        assert_eq!(evaluate(&[&p], "app/db", "read", &ctx2).code, Some(ErrorCode::IpNotAllowed));
        let ctx3 = RequestContext { ip: Some("192.168.1.1".parse().unwrap()), ..ctx2.clone() };
        assert_eq!(evaluate(&[&p], "app/db", "read", &ctx3).code, Some(ErrorCode::TimeWindowViolation));
        let mut p2 = p.clone();
        p2.rules[0].conditions.time_window.as_mut().unwrap().days = vec!["mon".into()];
        assert!(evaluate(&[&p2], "app/db", "read", &ctx3).allowed);
        p2.rules[0].conditions.time_window.as_mut().unwrap().timezone = "+09:00".into();
        assert_eq!(evaluate(&[&p2], "app/db", "read", &ctx3).code, Some(ErrorCode::TimeWindowViolation), "19:00");
        p2.rules[0].conditions.mfa_max_age = Some("30s".into());
        assert_eq!(evaluate(&[&p2], "app/db", "read", &ctx3).code, Some(ErrorCode::MfaRequired), "stale MFA");
    }

    #[test]
    fn rule_validation() {
        assert_eq!(validate_rules(&[]).unwrap_err().code, ErrorCode::InvalidPolicy);
        let bad_perm = rule("a", &["fly"], Conditions::default());
        assert_eq!(validate_rules(&[bad_perm]).unwrap_err().code, ErrorCode::InvalidPolicy);
        let bad_glob = rule("a**", &["read"], Conditions::default());
        assert_eq!(validate_rules(&[bad_glob]).unwrap_err().code, ErrorCode::InvalidGlob);
        let bad_cidr = rule("a", &["read"], Conditions { ip_ranges: vec!["10.0.0.0/33".into()], ..Default::default() });
        assert_eq!(validate_rules(&[bad_cidr]).unwrap_err().code, ErrorCode::InvalidPolicy);
        let bad_age = rule("a", &["read"], Conditions { mfa_max_age: Some("5 min".into()), ..Default::default() });
        assert_eq!(validate_rules(&[bad_age]).unwrap_err().code, ErrorCode::InvalidDuration);
        let tw =
            |tz: &str| TimeWindow { days: vec![], start: "09:00".into(), end: "17:00".into(), timezone: tz.into() };
        let bad_tz = rule("a", &["read"], Conditions { time_window: Some(tw("Mars/Olympus")), ..Default::default() });
        assert_eq!(validate_rules(&[bad_tz]).unwrap_err().code, ErrorCode::InvalidPolicy);
        let ok = rule("a/**", &["read", "list"], Conditions { time_window: Some(tw("-05:30")), ..Default::default() });
        assert!(validate_rules(&[ok]).is_ok());
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("127.0.0.0/8").unwrap().contains("::ffff:127.0.0.1".parse().unwrap()));
    }
}
