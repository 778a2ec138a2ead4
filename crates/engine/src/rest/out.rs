//! Writing documents in oVirt's two representations from one sequence of calls.
//!
//! Handlers describe a document as elements (`open`/`close`), leaves (`leaf`), references
//! (`reference`: an element with only `id`/`href`), links and arrays; [`Out`] writes it as XML
//! (the default) or as oVirt's JSON, where every scalar is a string, repeated elements are
//! arrays named after the element (`"vm": [...]`, `"link": [...]`), and `id`/`href` are plain
//! keys. Writing goes straight into one buffer: a collection of 10,000 VMs is a single pass
//! with no intermediate tree.
//!
//! Invariant: every `open` is matched by a `close` and every `array_open` by an
//! `array_close`, in nesting order (debug builds assert it).

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xml,
    Json,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Xml => "application/xml",
            Format::Json => "application/json",
        }
    }
}

#[derive(Debug)]
struct Frame {
    /// Inside a JSON array: members have no key.
    array: bool,
    /// Nothing written in this frame yet (JSON commas).
    first: bool,
}

pub struct Out {
    fmt: Format,
    buf: String,
    stack: Vec<Frame>,
    /// The request's `max`: a collection written here shows at most this many members.
    max: Option<usize>,
}

impl Out {
    pub fn new(fmt: Format) -> Self {
        Out {
            fmt,
            buf: String::with_capacity(4096),
            stack: Vec::new(),
            max: None,
        }
    }

    pub fn with_max(mut self, max: Option<usize>) -> Self {
        self.max = max;
        self
    }

    pub fn max(&self) -> Option<usize> {
        self.max
    }

    pub fn with_capacity(fmt: Format, cap: usize) -> Self {
        let mut o = Out::new(fmt);
        o.buf.reserve(cap);
        o
    }

    pub fn format(&self) -> Format {
        self.fmt
    }

    /// The finished document.
    pub fn finish(self) -> String {
        debug_assert!(self.stack.is_empty(), "unbalanced document: {:?}", self.stack);
        self.buf
    }

    /// JSON: the separator and key before a member of the current frame.
    fn key(&mut self, name: &str) {
        let Some(f) = self.stack.last_mut() else {
            return;
        };
        if !f.first {
            self.buf.push(',');
        }
        f.first = false;
        if !f.array {
            self.buf.push('"');
            json_escape(&mut self.buf, name);
            self.buf.push_str("\":");
        }
    }

    fn xml_attrs(&mut self, id: Option<&str>, href: Option<&str>) {
        if let Some(h) = href {
            self.buf.push_str(" href=\"");
            xml_escape(&mut self.buf, h);
            self.buf.push('"');
        }
        if let Some(i) = id {
            self.buf.push_str(" id=\"");
            xml_escape(&mut self.buf, i);
            self.buf.push('"');
        }
    }

    /// Starts the document; its root element is the next `open`.
    pub fn begin_document(&mut self) {
        debug_assert!(self.stack.is_empty() && self.buf.is_empty());
        if self.fmt == Format::Xml {
            self.buf
                .push_str("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n");
        }
    }

    /// Starts the document and opens its root element.
    pub fn root(&mut self, name: &str, id: Option<&str>, href: Option<&str>) {
        self.begin_document();
        self.open(name, id, href);
    }

    /// Opens an element (an object in JSON).
    pub fn open(&mut self, name: &str, id: Option<&str>, href: Option<&str>) {
        match self.fmt {
            Format::Xml => {
                self.buf.push('<');
                self.buf.push_str(name);
                self.xml_attrs(id, href);
                self.buf.push('>');
            }
            Format::Json => {
                self.key(name);
                self.buf.push('{');
                self.stack.push(Frame {
                    array: false,
                    first: true,
                });
                if let Some(h) = href {
                    self.leaf("href", h);
                }
                if let Some(i) = id {
                    self.leaf("id", i);
                }
                return;
            }
        }
        self.stack.push(Frame {
            array: false,
            first: true,
        });
    }

    pub fn close(&mut self, name: &str) {
        let f = self.stack.pop();
        debug_assert!(f.is_some_and(|f| !f.array), "close({name}) of an array");
        match self.fmt {
            Format::Xml => {
                self.buf.push_str("</");
                self.buf.push_str(name);
                self.buf.push('>');
            }
            Format::Json => self.buf.push('}'),
        }
    }

    /// A scalar child element.
    pub fn leaf(&mut self, name: &str, value: impl std::fmt::Display) {
        match self.fmt {
            Format::Xml => {
                self.buf.push('<');
                self.buf.push_str(name);
                self.buf.push('>');
                let start = self.buf.len();
                let _ = write!(self.buf, "{value}");
                if needs_xml_escape(&self.buf[start..]) {
                    let raw = self.buf.split_off(start);
                    xml_escape(&mut self.buf, &raw);
                }
                self.buf.push_str("</");
                self.buf.push_str(name);
                self.buf.push('>');
            }
            Format::Json => {
                self.key(name);
                self.buf.push('"');
                let start = self.buf.len();
                let _ = write!(self.buf, "{value}");
                if needs_json_escape(&self.buf[start..]) {
                    let raw = self.buf.split_off(start);
                    json_escape(&mut self.buf, &raw);
                }
                self.buf.push('"');
            }
        }
    }

    /// A leaf only when there is a value.
    pub fn opt_leaf(&mut self, name: &str, value: Option<impl std::fmt::Display>) {
        if let Some(v) = value {
            self.leaf(name, v);
        }
    }

    /// An element with only `id` and `href` (a reference to another object).
    pub fn reference(&mut self, name: &str, id: &str, href: &str) {
        match self.fmt {
            Format::Xml => {
                self.buf.push('<');
                self.buf.push_str(name);
                self.xml_attrs(Some(id), Some(href));
                self.buf.push_str("/>");
            }
            Format::Json => {
                self.open(name, Some(id), Some(href));
                self.close(name);
            }
        }
    }

    /// Starts a run of repeated `name` elements (a JSON array `"name": [...]`); members are
    /// written with `open(name, ..)`/`reference(name, ..)`/`leaf(name, ..)`.
    pub fn array_open(&mut self, name: &str) {
        if self.fmt == Format::Json {
            self.key(name);
            self.buf.push('[');
        }
        self.stack.push(Frame {
            array: true,
            first: true,
        });
    }

    pub fn array_close(&mut self) {
        let f = self.stack.pop();
        debug_assert!(f.is_some_and(|f| f.array), "array_close of an element");
        if self.fmt == Format::Json {
            self.buf.push(']');
        }
    }

    /// `<link rel=".." href=".."/>` for each sub-collection.
    pub fn links(&mut self, base_href: &str, rels: &[&str]) {
        if rels.is_empty() {
            return;
        }
        self.array_open("link");
        for rel in rels {
            match self.fmt {
                Format::Xml => {
                    self.buf.push_str("<link href=\"");
                    xml_escape(&mut self.buf, base_href);
                    self.buf.push('/');
                    self.buf.push_str(rel);
                    self.buf.push_str("\" rel=\"");
                    self.buf.push_str(rel);
                    self.buf.push_str("\"/>");
                }
                Format::Json => {
                    self.key("link");
                    self.buf.push_str("{\"href\":\"");
                    json_escape(&mut self.buf, base_href);
                    self.buf.push('/');
                    self.buf.push_str(rel);
                    self.buf.push_str("\",\"rel\":\"");
                    self.buf.push_str(rel);
                    self.buf.push_str("\"}");
                }
            }
        }
        self.array_close();
    }
}

fn needs_xml_escape(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''))
}

fn needs_json_escape(s: &str) -> bool {
    s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
}

pub fn xml_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

pub fn json_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(fmt: Format) -> String {
        let mut o = Out::new(fmt);
        o.root("vms", None, None);
        o.array_open("vm");
        o.open("vm", Some("1"), Some("/api/vms/1"));
        o.leaf("name", "a<b\"c");
        o.reference("cluster", "2", "/api/clusters/2");
        o.links("/api/vms/1", &["nics", "snapshots"]);
        o.close("vm");
        o.open("vm", Some("3"), None);
        o.leaf("memory", 1024u64);
        o.close("vm");
        o.array_close();
        o.close("vms");
        o.finish()
    }

    #[test]
    fn xml_document() {
        assert_eq!(
            doc(Format::Xml),
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<vms>\
             <vm href=\"/api/vms/1\" id=\"1\"><name>a&lt;b&quot;c</name>\
             <cluster href=\"/api/clusters/2\" id=\"2\"/>\
             <link href=\"/api/vms/1/nics\" rel=\"nics\"/><link href=\"/api/vms/1/snapshots\" rel=\"snapshots\"/>\
             </vm><vm id=\"3\"><memory>1024</memory></vm></vms>"
        );
    }

    #[test]
    fn json_document_parses_with_arrays_and_string_scalars() {
        let s = doc(Format::Json);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["vm"][0]["name"], "a<b\"c");
        assert_eq!(v["vm"][0]["id"], "1");
        assert_eq!(v["vm"][0]["cluster"]["href"], "/api/clusters/2");
        assert_eq!(v["vm"][0]["link"][1]["rel"], "snapshots");
        assert_eq!(v["vm"][1]["memory"], "1024");
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut o = Out::new(Format::Json);
        o.root("x", None, None);
        o.leaf("d", "a\u{1}\n");
        o.close("x");
        let v: serde_json::Value = serde_json::from_str(&o.finish()).unwrap();
        assert_eq!(v["d"], "a\u{1}\n");
    }
}
