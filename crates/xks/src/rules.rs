//! Secondary authorization (spec §Authorization): per key store rules over the request metadata and the XKS
//! operation. Deny rules win; when any allow rule exists one must match; no rules allow everything. Never
//! applied to GetHealthStatus.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The XKS operations rules can name (`health` is deliberately absent: it is exempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XksOperation {
    Metadata,
    Encrypt,
    Decrypt,
}

impl XksOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            XksOperation::Metadata => "metadata",
            XksOperation::Encrypt => "encrypt",
            XksOperation::Decrypt => "decrypt",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// One rule. Every condition it lists must match (absent = any); within a list one entry must match. Entries
/// are glob patterns (`*` any run, `?` one character); the empty string matches an absent field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Named in the log line of every request it decides.
    pub name: String,
    pub effect: Effect,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operations: Option<Vec<XksOperation>>,
    /// `awsPrincipalArn` patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_operations: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_via_services: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_vpcs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_vpces: Option<Vec<String>>,
}

/// The rules of one key store, in the order written (the first matching deny, or allow, is named).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// The outcome, with the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No rules, or the named allow rule matched.
    Allow(Option<String>),
    /// The named deny rule matched, or (`None`) allow rules exist and none matched.
    Deny(Option<String>),
}

impl Rules {
    /// Refuses rule sets that could not mean what their author wanted.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for r in &self.rules {
            if r.name.is_empty() || r.name.len() > 128 || !r.name.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err("every rule needs a name of 1-128 visible ASCII characters".to_owned());
            }
            if !seen.insert(r.name.as_str()) {
                return Err(format!("rule names must be unique: {}", r.name));
            }
            let lists = [
                &r.principals,
                &r.kms_operations,
                &r.kms_via_services,
                &r.kms_key_arns,
                &r.source_vpcs,
                &r.source_vpces,
            ];
            if lists.iter().any(|l| l.as_ref().is_some_and(Vec::is_empty))
                || r.operations.as_ref().is_some_and(Vec::is_empty)
            {
                return Err(format!("rule {}: an empty list can never match; omit the condition instead", r.name));
            }
        }
        Ok(())
    }

    pub fn evaluate(&self, op: XksOperation, metadata: &BTreeMap<String, String>) -> Decision {
        if self.rules.is_empty() {
            return Decision::Allow(None);
        }
        let matching = |effect: Effect| {
            self.rules.iter().find(|r| r.effect == effect && r.matches(op, metadata)).map(|r| r.name.clone())
        };
        if let Some(name) = matching(Effect::Deny) {
            return Decision::Deny(Some(name));
        }
        if !self.rules.iter().any(|r| r.effect == Effect::Allow) {
            return Decision::Allow(None);
        }
        match matching(Effect::Allow) {
            Some(name) => Decision::Allow(Some(name)),
            None => Decision::Deny(None),
        }
    }
}

impl Rule {
    fn matches(&self, op: XksOperation, md: &BTreeMap<String, String>) -> bool {
        if let Some(ops) = &self.operations
            && !ops.contains(&op)
        {
            return false;
        }
        let field = |name: &str, patterns: &Option<Vec<String>>| -> bool {
            let Some(patterns) = patterns else { return true };
            let value = md.get(name).map(String::as_str).unwrap_or("");
            patterns.iter().any(|p| glob(p, value))
        };
        field("awsPrincipalArn", &self.principals)
            && field("kmsOperation", &self.kms_operations)
            && field("kmsViaService", &self.kms_via_services)
            && field("kmsKeyArn", &self.kms_key_arns)
            && field("awsSourceVpc", &self.source_vpcs)
            && field("awsSourceVpce", &self.source_vpces)
    }
}

/// `*` matches any run (also empty), `?` one character; everything else literally. Linear-time (no
/// backtracking blow-up on hostile ARNs): the classic two-pointer algorithm.
pub fn glob(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == v[vi])) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn globbing() {
        assert!(glob("arn:aws:iam::111122223333:*", "arn:aws:iam::111122223333:role/x"));
        assert!(!glob("arn:aws:iam::111122223333:*", "arn:aws:iam::999922223333:role/x"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*", ""));
        assert!(glob("", ""));
        assert!(!glob("", "x"));
        assert!(glob("*b*b*", "abxxbz"));
        assert!(!glob("*b*b*", "abxxz"));
        assert!(!glob(&"*a".repeat(50), &"a".repeat(40)));
    }

    #[test]
    fn deny_wins_allow_needs_a_match_and_no_rules_allows() {
        let none = Rules::default();
        assert_eq!(none.evaluate(XksOperation::Encrypt, &md(&[])), Decision::Allow(None));
        let rules: Rules = serde_json::from_str(
            r#"{"rules":[
                {"name":"no-bob","effect":"deny","principals":["arn:aws:iam::*:user/bob"]},
                {"name":"ebs","effect":"allow","operations":["encrypt","decrypt"],"kmsViaServices":["ebs",""]},
                {"name":"create","effect":"allow","operations":["metadata"],"kmsOperations":["CreateKey","DescribeKey"]}
            ]}"#,
        )
        .unwrap_or_default();
        assert_eq!(rules.rules.len(), 3);
        assert_eq!(rules.validate(), Ok(()));
        let alice = ("awsPrincipalArn", "arn:aws:iam::1:user/alice");
        let bob = ("awsPrincipalArn", "arn:aws:iam::1:user/bob");
        assert_eq!(
            rules.evaluate(XksOperation::Encrypt, &md(&[bob, ("kmsViaService", "ebs")])),
            Decision::Deny(Some("no-bob".into()))
        );
        assert_eq!(
            rules.evaluate(XksOperation::Encrypt, &md(&[alice, ("kmsViaService", "ebs")])),
            Decision::Allow(Some("ebs".into()))
        );
        // The empty pattern matches an absent kmsViaService.
        assert_eq!(rules.evaluate(XksOperation::Decrypt, &md(&[alice])), Decision::Allow(Some("ebs".into())));
        assert_eq!(rules.evaluate(XksOperation::Decrypt, &md(&[alice, ("kmsViaService", "s3")])), Decision::Deny(None));
        assert_eq!(
            rules.evaluate(XksOperation::Metadata, &md(&[alice, ("kmsOperation", "CreateKey")])),
            Decision::Allow(Some("create".into()))
        );
        assert_eq!(
            rules.evaluate(XksOperation::Metadata, &md(&[alice, ("kmsOperation", "Other")])),
            Decision::Deny(None)
        );
        // Only deny rules: everything else is allowed.
        let only_deny: Rules =
            serde_json::from_str(r#"{"rules":[{"name":"vpc","effect":"deny","sourceVpcs":["vpc-bad*"]}]}"#)
                .unwrap_or_default();
        assert_eq!(only_deny.evaluate(XksOperation::Encrypt, &md(&[alice])), Decision::Allow(None));
        assert_eq!(
            only_deny.evaluate(XksOperation::Encrypt, &md(&[("awsSourceVpc", "vpc-bad1")])),
            Decision::Deny(Some("vpc".into()))
        );
    }

    #[test]
    fn bad_rule_files_are_refused() {
        assert!(
            serde_json::from_str::<Rules>(r#"{"rules":[{"name":"x","effect":"allow","princpals":["*"]}]}"#).is_err()
        );
        assert!(serde_json::from_str::<Rules>(r#"{"rules":[{"name":"x","effect":"maybe"}]}"#).is_err());
        assert!(
            serde_json::from_str::<Rules>(r#"{"rules":[{"name":"x","effect":"allow","operations":["health"]}]}"#)
                .is_err()
        );
        let dup: Rules =
            serde_json::from_str(r#"{"rules":[{"name":"x","effect":"allow"},{"name":"x","effect":"deny"}]}"#)
                .unwrap_or_default();
        assert!(dup.validate().is_err());
        let empty: Rules =
            serde_json::from_str(r#"{"rules":[{"name":"x","effect":"allow","principals":[]}]}"#).unwrap_or_default();
        assert!(empty.validate().is_err());
    }
}
