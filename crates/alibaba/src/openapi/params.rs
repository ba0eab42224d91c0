//! Request parameters: the query string and an `application/x-www-form-urlencoded` body, merged. A name given
//! twice (in either place) is refused: the signature covers one value per name.

use std::collections::BTreeMap;

use super::error::OapiError;

/// The merged parameters of one request.
#[derive(Debug, Default, Clone)]
pub struct Params(pub BTreeMap<String, String>);

impl Params {
    pub fn parse(query: &str, form_body: Option<&[u8]>) -> Result<Self, OapiError> {
        let mut map = BTreeMap::new();
        let mut add = |bytes: &[u8]| -> Result<(), OapiError> {
            for (k, v) in form_urlencoded::parse(bytes) {
                if map.insert(k.into_owned(), v.into_owned()).is_some() {
                    return Err(OapiError::parse_failure("A request parameter is given more than once."));
                }
            }
            Ok(())
        };
        add(query.as_bytes())?;
        if let Some(body) = form_body {
            if std::str::from_utf8(body).is_err() {
                return Err(OapiError::parse_failure("The request body is not valid form data."));
            }
            add(body)?;
        }
        Ok(Params(map))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A present and non-empty parameter.
    pub fn opt(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    pub fn req(&self, name: &str) -> Result<&str, OapiError> {
        self.opt(name).ok_or_else(|| OapiError::missing(name))
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, OapiError> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(_) => Err(OapiError::invalid(name)),
        }
    }

    pub fn u32(&self, name: &str) -> Result<Option<u32>, OapiError> {
        self.opt(name).map(|v| v.parse::<u32>().map_err(|_| OapiError::invalid(name))).transpose()
    }

    /// A JSON-valued parameter (EncryptionContext, Tags, Filters...).
    pub fn json(&self, name: &str) -> Result<Option<serde_json::Value>, OapiError> {
        self.opt(name)
            .map(|v| {
                serde_json::from_str(v)
                    .map_err(|_| OapiError::parse_failure(format!("The parameter \"{name}\" is not valid JSON.")))
            })
            .transpose()
    }
}

/// RFC 3986 percent-encoding of the vendor's signatures: keep `A-Z a-z 0-9 - _ . ~`, every other byte of the
/// UTF-8 becomes `%XX` in upper case.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `k=v` pairs sorted by name, both percent-encoded, joined with `&`; `skip` names are left out.
pub fn canonical_query(params: &BTreeMap<String, String>, skip: &[&str]) -> String {
    params
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_decodes_and_refuses_duplicates() {
        let p = Params::parse("Action=Encrypt&Plaintext=a+b%2Bc", Some(b"SecretData=x%26y")).unwrap();
        assert_eq!(p.get("Plaintext"), Some("a b+c"));
        assert_eq!(p.get("SecretData"), Some("x&y"));
        assert!(Params::parse("A=1&A=2", None).is_err());
        assert!(Params::parse("A=1", Some(b"A=2")).is_err());
    }

    #[test]
    fn encodes_like_the_vendor() {
        assert_eq!(percent_encode("a b*c~/:"), "a%20b%2Ac~%2F%3A");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
