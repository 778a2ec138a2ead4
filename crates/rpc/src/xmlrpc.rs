//! XML-RPC, mapped onto the same JSON values the JSON-RPC side uses.
//!
//! A call's parameters become named parameters when the call passes exactly one `<struct>`
//! (how oxvirt's verbs are called over XML-RPC); otherwise they are passed as a positional
//! array, which the dispatcher rejects for verbs that take named parameters.
//!
//! Mapping: `int`/`i4`/`i8` ↔ integer, `boolean` ↔ bool, `double` ↔ float, `string` ↔
//! string, `struct` ↔ object, `array` ↔ array, `nil` ↔ null; `base64` and `dateTime.iso8601`
//! arrive as strings. Integers beyond 32 bits are sent as `<i8>`.

use base64::Engine as _;
use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::{Map, Number, Value};

/// Deeper documents are refused: a hostile body must not exhaust the stack.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XML-RPC: {0}")]
pub struct XmlRpcError(pub String);

fn bad(msg: impl Into<String>) -> XmlRpcError {
    XmlRpcError(msg.into())
}

#[derive(Debug, Default)]
struct Element {
    name: String,
    children: Vec<Element>,
    text: String,
}

impl Element {
    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
}

fn parse_dom(xml: &[u8]) -> Result<Element, XmlRpcError> {
    let mut reader = Reader::from_reader(xml);
    let mut stack: Vec<Element> = vec![Element::default()];
    loop {
        match reader.read_event().map_err(|e| bad(e.to_string()))? {
            Event::Start(e) => {
                if stack.len() > MAX_DEPTH {
                    return Err(bad("nesting too deep"));
                }
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                stack.push(Element {
                    name,
                    ..Default::default()
                });
            }
            Event::Empty(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                stack.last_mut().expect("root").children.push(Element {
                    name,
                    ..Default::default()
                });
            }
            Event::End(_) => {
                let done = stack.pop().expect("element");
                let parent = stack.last_mut().ok_or_else(|| bad("unbalanced tags"))?;
                parent.children.push(done);
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(|e| bad(e.to_string()))?;
                stack.last_mut().expect("root").text.push_str(&s);
            }
            Event::CData(t) => {
                stack
                    .last_mut()
                    .expect("root")
                    .text
                    .push_str(&String::from_utf8_lossy(&t));
            }
            Event::Eof => break,
            Event::DocType(_) => return Err(bad("DOCTYPE is not allowed")),
            _ => {}
        }
    }
    if stack.len() != 1 {
        return Err(bad("unexpected end of document"));
    }
    let mut root = stack.pop().expect("root");
    if root.children.len() != 1 {
        return Err(bad("expected exactly one root element"));
    }
    Ok(root.children.remove(0))
}

fn value_of(v: &Element) -> Result<Value, XmlRpcError> {
    let Some(inner) = v.children.first() else {
        // `<value>text</value>` without a type is a string.
        return Ok(Value::String(v.text.clone()));
    };
    let text = inner.text.trim();
    Ok(match inner.name.as_str() {
        "int" | "i4" | "i8" => Value::Number(
            text.parse::<i64>()
                .map_err(|_| bad(format!("bad integer {text:?}")))?
                .into(),
        ),
        "boolean" => match text {
            "1" => Value::Bool(true),
            "0" => Value::Bool(false),
            _ => return Err(bad(format!("bad boolean {text:?}"))),
        },
        "double" => {
            let f: f64 = text.parse().map_err(|_| bad(format!("bad double {text:?}")))?;
            Value::Number(Number::from_f64(f).ok_or_else(|| bad("non-finite double"))?)
        }
        "string" => Value::String(inner.text.clone()),
        "dateTime.iso8601" => Value::String(text.to_string()),
        "base64" => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(text.split_whitespace().collect::<String>())
                .map_err(|_| bad("bad base64"))?;
            Value::String(String::from_utf8(raw).map_err(|_| bad("base64 value is not UTF-8 text"))?)
        }
        "nil" => Value::Null,
        "array" => {
            let data = inner.child("data").ok_or_else(|| bad("array without data"))?;
            Value::Array(
                data.children
                    .iter()
                    .filter(|c| c.name == "value")
                    .map(value_of)
                    .collect::<Result<_, _>>()?,
            )
        }
        "struct" => {
            let mut m = Map::new();
            for member in inner.children.iter().filter(|c| c.name == "member") {
                let name = member.child("name").ok_or_else(|| bad("member without name"))?;
                let value = member.child("value").ok_or_else(|| bad("member without value"))?;
                m.insert(name.text.clone(), value_of(value)?);
            }
            Value::Object(m)
        }
        other => return Err(bad(format!("unknown value type <{other}>"))),
    })
}

/// Parses a `<methodCall>` into its method name and parameters.
pub fn parse_call(xml: &[u8]) -> Result<(String, Value), XmlRpcError> {
    let root = parse_dom(xml)?;
    if root.name != "methodCall" {
        return Err(bad("root element must be methodCall"));
    }
    let method = root
        .child("methodName")
        .ok_or_else(|| bad("missing methodName"))?
        .text
        .trim()
        .to_string();
    if method.is_empty() {
        return Err(bad("empty methodName"));
    }
    let mut params = Vec::new();
    if let Some(ps) = root.child("params") {
        for p in ps.children.iter().filter(|c| c.name == "param") {
            params.push(value_of(
                p.child("value").ok_or_else(|| bad("param without value"))?,
            )?);
        }
    }
    let params = match params.len() {
        0 => Value::Object(Map::new()),
        1 if params[0].is_object() => params.remove(0),
        _ => Value::Array(params),
    };
    Ok((method, params))
}

fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

fn write_value(out: &mut String, v: &Value) {
    out.push_str("<value>");
    match v {
        Value::Null => out.push_str("<nil/>"),
        Value::Bool(b) => out.push_str(&format!("<boolean>{}</boolean>", u8::from(*b))),
        Value::Number(n) => match n.as_i64() {
            Some(i) if i32::try_from(i).is_ok() => out.push_str(&format!("<int>{i}</int>")),
            Some(i) => out.push_str(&format!("<i8>{i}</i8>")),
            None => match n.as_u64() {
                Some(u) => out.push_str(&format!("<string>{u}</string>")),
                None => out.push_str(&format!("<double>{}</double>", n.as_f64().unwrap_or(0.0))),
            },
        },
        Value::String(s) => out.push_str(&format!("<string>{}</string>", escape(s))),
        Value::Array(items) => {
            out.push_str("<array><data>");
            for i in items {
                write_value(out, i);
            }
            out.push_str("</data></array>");
        }
        Value::Object(m) => {
            out.push_str("<struct>");
            for (k, v) in m {
                out.push_str(&format!("<member><name>{}</name>", escape(k)));
                write_value(out, v);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
    }
    out.push_str("</value>");
}

pub fn success_response(result: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><params><param>");
    write_value(&mut out, result);
    out.push_str("</param></params></methodResponse>\n");
    out
}

pub fn fault_response(code: i64, message: &str) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><fault>");
    let mut m = Map::new();
    m.insert("faultCode".into(), code.into());
    m.insert("faultString".into(), message.into());
    write_value(&mut out, &Value::Object(m));
    out.push_str("</fault></methodResponse>\n");
    out
}

/// A `<methodCall>` (used by tests and tools that speak XML-RPC to a node).
pub fn call(method: &str, params: &[Value]) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\"?>\n<methodCall><methodName>{}</methodName><params>",
        escape(method)
    );
    for p in params {
        out.push_str("<param>");
        write_value(&mut out, p);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>\n");
    out
}

/// Parses a `<methodResponse>`: `Ok(value)` or `Err((faultCode, faultString))`.
pub fn parse_response(xml: &[u8]) -> Result<Result<Value, (i64, String)>, XmlRpcError> {
    let root = parse_dom(xml)?;
    if root.name != "methodResponse" {
        return Err(bad("root element must be methodResponse"));
    }
    if let Some(f) = root.child("fault") {
        let v = value_of(f.child("value").ok_or_else(|| bad("fault without value"))?)?;
        let code = v["faultCode"]
            .as_i64()
            .ok_or_else(|| bad("fault without faultCode"))?;
        let msg = v["faultString"].as_str().unwrap_or_default().to_string();
        return Ok(Err((code, msg)));
    }
    let p = root
        .child("params")
        .and_then(|p| p.child("param"))
        .and_then(|p| p.child("value"))
        .ok_or_else(|| bad("response without a value"))?;
    Ok(Ok(value_of(p)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_every_type() {
        let v = json!({"a": 1, "big": 1i64 << 40, "b": true, "d": 1.5, "s": "x<&>y", "n": null,
                       "arr": [1, "two", {"k": []}]});
        let xml = call("Host.getStats", std::slice::from_ref(&v));
        let (method, params) = parse_call(xml.as_bytes()).unwrap();
        assert_eq!(method, "Host.getStats");
        assert_eq!(
            params, v,
            "a single struct parameter becomes the named parameters"
        );
        let resp = success_response(&v);
        assert_eq!(parse_response(resp.as_bytes()).unwrap().unwrap(), v);
    }

    #[test]
    fn faults_round_trip() {
        let f = fault_response(1, "Virtual machine does not exist");
        assert_eq!(
            parse_response(f.as_bytes()).unwrap().unwrap_err(),
            (1, "Virtual machine does not exist".into())
        );
    }

    #[test]
    fn plain_values_base64_and_positional_params() {
        let xml = br#"<?xml version="1.0"?><methodCall><methodName>X</methodName><params>
            <param><value>  spaced  </value></param><param><value><base64>aGk=</base64></value></param>
            </params></methodCall>"#;
        let (_, params) = parse_call(xml).unwrap();
        assert_eq!(params, json!(["  spaced  ", "hi"]));
    }

    #[test]
    fn hostile_documents_are_refused() {
        assert!(parse_call(b"<methodCall>").is_err());
        assert!(parse_call(b"<nope/>").is_err());
        let deep = format!(
            "<methodCall><methodName>X</methodName><params><param>{}{}</param></params></methodCall>",
            "<value><array><data>".repeat(100),
            "</data></array></value>".repeat(100)
        );
        assert!(parse_call(deep.as_bytes()).unwrap_err().0.contains("deep"));
        let doctype =
            br#"<!DOCTYPE x [<!ENTITY a "b">]><methodCall><methodName>&a;</methodName></methodCall>"#;
        assert!(parse_call(doctype).is_err());
        assert!(parse_call(b"<methodCall><methodName>X</methodName><params><param><value><int>x</int></value></param></params></methodCall>").is_err());
    }
}
