//! Reading request bodies: XML or JSON into one element tree the handlers query.
//!
//! Both representations become an [`Elem`]: XML attributes (`id`, `href`) and JSON keys `id`
//! and `href` are attributes; JSON arrays become repeated children of the array's name
//! (`"disk": [{..}, {..}]` → two `disk` children); JSON scalars of any type become text.
//! Unknown elements are kept and ignored by the handlers, as oVirt does.

use quick_xml::events::Event;

use super::fault::ApiError;

/// Bodies nest no deeper than this (a hostile document cannot exhaust the stack).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Elem {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Elem>,
}

impl Elem {
    pub fn new(name: &str) -> Self {
        Elem {
            name: name.to_string(),
            ..Default::default()
        }
    }

    pub fn child(&self, name: &str) -> Option<&Elem> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Elem> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at a `/`-separated path of child names.
    pub fn get(&self, path: &str) -> Option<&Elem> {
        let mut e = self;
        for part in path.split('/') {
            e = e.child(part)?;
        }
        Some(e)
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `id` as an attribute (XML, JSON) or as a child element.
    pub fn id(&self) -> Option<&str> {
        self.attr("id")
            .or_else(|| self.child("id").map(|c| c.text.trim()))
            .filter(|s| !s.is_empty())
    }

    /// The trimmed text at `path`, if present and not empty.
    pub fn str(&self, path: &str) -> Option<&str> {
        self.get(path).map(|e| e.text.trim()).filter(|s| !s.is_empty())
    }

    pub fn string(&self, path: &str) -> Option<String> {
        self.str(path).map(str::to_string)
    }

    pub fn bool(&self, path: &str) -> Result<Option<bool>, ApiError> {
        match self.str(path) {
            None => Ok(None),
            Some(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(s) => Err(ApiError::bad_request(format!(
                "<{path}> must be true or false, not {s:?}"
            ))),
        }
    }

    pub fn u64(&self, path: &str) -> Result<Option<u64>, ApiError> {
        match self.str(path) {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("<{path}> must be a non-negative integer, not {s:?}"))
            }),
        }
    }

    pub fn u32(&self, path: &str) -> Result<Option<u32>, ApiError> {
        match self.u64(path)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("<{path}> {v} is too large"))),
        }
    }

    pub fn i32(&self, path: &str) -> Result<Option<i32>, ApiError> {
        match self.str(path) {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("<{path}> must be an integer, not {s:?}"))),
        }
    }

    /// An enum value by its lowercase oVirt name.
    pub fn parse<T: std::str::FromStr>(&self, path: &str) -> Result<Option<T>, ApiError> {
        match self.str(path) {
            None => Ok(None),
            Some(s) => s
                .to_ascii_lowercase()
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("<{path}> has an unknown value {s:?}"))),
        }
    }
}

/// Parses a request body; `json` when the request's `Content-Type` says so.
pub fn parse_body(body: &[u8], json: bool, root: &str) -> Result<Elem, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "the request needs a <{root}> body"
        )));
    }
    if json {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
        let mut e = Elem::new(root);
        from_json(&mut e, &v, 0)?;
        Ok(e)
    } else {
        parse_xml(body)
    }
}

fn from_json(e: &mut Elem, v: &serde_json::Value, depth: usize) -> Result<(), ApiError> {
    use serde_json::Value;
    if depth > MAX_DEPTH {
        return Err(ApiError::bad_request("the request body nests too deeply"));
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::Array(items) => {
                        for it in items {
                            let mut c = Elem::new(k);
                            from_json(&mut c, it, depth + 1)?;
                            e.children.push(c);
                        }
                    }
                    Value::String(s) if k == "id" || k == "href" => e.attrs.push((k.clone(), s.clone())),
                    v => {
                        let mut c = Elem::new(k);
                        from_json(&mut c, v, depth + 1)?;
                        e.children.push(c);
                    }
                }
            }
        }
        Value::String(s) => e.text = s.clone(),
        Value::Null => {}
        Value::Bool(b) => e.text = b.to_string(),
        Value::Number(n) => e.text = n.to_string(),
        Value::Array(items) => {
            // A bare array at the root: its members are children named like the root.
            for it in items {
                let mut c = Elem::new(&e.name);
                from_json(&mut c, it, depth + 1)?;
                e.children.push(c);
            }
        }
    }
    Ok(())
}

fn bad_xml(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the request body is not valid XML: {e}"))
}

fn start_elem(s: &quick_xml::events::BytesStart<'_>) -> Result<Elem, ApiError> {
    let name = std::str::from_utf8(s.local_name().as_ref())
        .map_err(bad_xml)?
        .to_string();
    let mut e = Elem::new(&name);
    for a in s.attributes() {
        let a = a.map_err(bad_xml)?;
        let k = std::str::from_utf8(a.key.local_name().as_ref())
            .map_err(bad_xml)?
            .to_string();
        let v = a.unescape_value().map_err(bad_xml)?.into_owned();
        e.attrs.push((k, v));
    }
    Ok(e)
}

pub fn parse_xml(body: &[u8]) -> Result<Elem, ApiError> {
    let mut r = quick_xml::Reader::from_reader(body);
    let mut stack: Vec<Elem> = Vec::new();
    let mut buf = Vec::new();
    loop {
        match r.read_event_into(&mut buf).map_err(bad_xml)? {
            Event::Start(s) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(ApiError::bad_request("the request body nests too deeply"));
                }
                stack.push(start_elem(&s)?);
            }
            Event::Empty(s) => {
                let e = start_elem(&s)?;
                match stack.last_mut() {
                    Some(p) => p.children.push(e),
                    None => return Ok(e),
                }
            }
            Event::End(_) => {
                let e = stack.pop().ok_or_else(|| bad_xml("unbalanced end tag"))?;
                match stack.last_mut() {
                    Some(p) => p.children.push(e),
                    None => return Ok(e),
                }
            }
            Event::Text(t) => {
                if let Some(p) = stack.last_mut() {
                    p.text.push_str(&t.unescape().map_err(bad_xml)?);
                }
            }
            Event::CData(t) => {
                if let Some(p) = stack.last_mut() {
                    p.text.push_str(std::str::from_utf8(&t).map_err(bad_xml)?);
                }
            }
            Event::Eof => return Err(bad_xml("the document ends before its root element closes")),
            _ => {}
        }
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_and_json_give_the_same_tree() {
        let x = parse_body(
            br#"<?xml version="1.0"?><vm><name>a &amp; b</name><cluster id="c1"/>
               <cpu><topology><cores>2</cores></topology></cpu>
               <disks><disk id="d1"/><disk id="d2"/></disks></vm>"#,
            false,
            "vm",
        )
        .unwrap();
        let j = parse_body(
            br#"{"name":"a & b","cluster":{"id":"c1"},"cpu":{"topology":{"cores":2}},
                "disks":{"disk":[{"id":"d1"},{"id":"d2"}]}}"#,
            true,
            "vm",
        )
        .unwrap();
        for e in [&x, &j] {
            assert_eq!(e.str("name"), Some("a & b"));
            assert_eq!(e.get("cluster").and_then(Elem::id), Some("c1"));
            assert_eq!(e.u32("cpu/topology/cores").unwrap(), Some(2));
            let ids: Vec<_> = e
                .get("disks")
                .unwrap()
                .children_named("disk")
                .filter_map(Elem::id)
                .collect();
            assert_eq!(ids, ["d1", "d2"]);
        }
    }

    #[test]
    fn bad_bodies_are_refused() {
        assert!(parse_body(b"<vm><name>x</vm>", false, "vm").is_err());
        assert!(parse_body(b"", false, "vm").is_err());
        assert!(parse_body(b"{", true, "vm").is_err());
        let e = parse_body(b"<vm><memory>lots</memory></vm>", false, "vm").unwrap();
        assert!(e.u64("memory").is_err());
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(parse_body(deep.as_bytes(), false, "a").is_err());
    }
}
