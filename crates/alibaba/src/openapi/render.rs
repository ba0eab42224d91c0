//! Success and error bodies: JSON (`Format=JSON`, the default) or XML (`Format=XML`: `<ActionResponse>` for
//! results, `<KMS>` for errors; a JSON array under a name becomes that element repeated).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::error::OapiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

impl Format {
    pub fn of_query(query: &str) -> Self {
        let xml = form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "Format" && v.eq_ignore_ascii_case("xml"));
        if xml { Format::Xml } else { Format::Json }
    }
}

fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

fn element(name: &str, v: &Value, out: &mut String) {
    match v {
        Value::Null => {}
        Value::Array(items) => {
            for item in items {
                element(name, item, out);
            }
        }
        other => {
            out.push('<');
            out.push_str(name);
            out.push('>');
            match other {
                Value::Object(map) => children(map, out),
                Value::String(s) => escape(s, out),
                scalar => escape(&scalar.to_string(), out),
            }
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        }
    }
}

fn children(map: &Map<String, Value>, out: &mut String) {
    for (k, v) in map {
        element(k, v, out);
    }
}

pub fn to_xml(root: &str, map: &Map<String, Value>) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    out.push('<');
    out.push_str(root);
    out.push('>');
    children(map, &mut out);
    out.push_str("</");
    out.push_str(root);
    out.push('>');
    out
}

fn respond(status: StatusCode, format: Format, body: String) -> Response {
    let mut r = (status, body).into_response();
    let ct = match format {
        Format::Json => "application/json;charset=utf-8",
        Format::Xml => "text/xml;charset=utf-8",
    };
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

pub fn success(format: Format, action: &str, body: Value, request_id: &str) -> Response {
    let mut map = match body {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    map.insert("RequestId".to_owned(), Value::String(request_id.to_owned()));
    match format {
        Format::Json => respond(StatusCode::OK, format, Value::Object(map).to_string()),
        Format::Xml => {
            // The action was checked against the dispatch table, so it is a plain identifier here.
            let root = format!("{}Response", super::error::shown(action));
            respond(StatusCode::OK, format, to_xml(&root, &map))
        }
    }
}

pub fn error(format: Format, e: &OapiError, request_id: &str) -> Response {
    let mut map = Map::new();
    map.insert("HttpStatus".to_owned(), Value::from(e.status.as_u16()));
    map.insert("Code".to_owned(), Value::String(e.code.to_owned()));
    map.insert("Message".to_owned(), Value::String(e.message.clone()));
    map.insert("RequestId".to_owned(), Value::String(request_id.to_owned()));
    match format {
        Format::Json => respond(e.status, format, Value::Object(map).to_string()),
        Format::Xml => respond(e.status, format, to_xml("KMS", &map)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_repeats_arrays_and_escapes() {
        let v = serde_json::json!({"Keys": {"Key": [{"KeyId": "a"}, {"KeyId": "b<"}]}, "TotalCount": 2});
        let Value::Object(m) = v else { unreachable!() };
        assert_eq!(
            to_xml("ListKeysResponse", &m),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListKeysResponse><Keys><Key><KeyId>a</KeyId></Key><Key><KeyId>b&lt;</KeyId></Key></Keys><TotalCount>2</TotalCount></ListKeysResponse>"
        );
        assert_eq!(Format::of_query("Format=XML&A=1"), Format::Xml);
        assert_eq!(Format::of_query("A=1"), Format::Json);
    }
}
