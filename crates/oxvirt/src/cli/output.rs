//! Printing objects: `--output json` prints the API's JSON as it came (a list is an array);
//! `--output table` prints aligned columns for a list and `FIELD  value` lines for one object,
//! with references shown by name (each referenced collection is fetched once per command).

use std::collections::HashMap;

use serde_json::Value;

use super::api::Api;
use super::kinds::{Fmt, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Names of referenced objects by id, per collection, fetched on first use.
#[derive(Default)]
pub struct Names(HashMap<&'static str, HashMap<String, String>>);

impl Names {
    async fn name(&mut self, api: &Api, kind: &'static Kind, id: &str) -> String {
        if !self.0.contains_key(kind.coll) {
            // A name is a nicety: when the collection cannot be read the id is shown.
            let m = api
                .list(kind.coll, kind.elem, &[])
                .await
                .unwrap_or_default()
                .into_iter()
                .filter_map(|o| Some((o["id"].as_str()?.to_string(), o["name"].as_str()?.to_string())))
                .collect();
            self.0.insert(kind.coll, m);
        }
        self.0[kind.coll]
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
}

pub fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// `268435456` → `256 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn cell(api: &Api, names: &mut Names, obj: &Value, path: &str, fmt: Fmt) -> String {
    let v = at(obj, path);
    match fmt {
        Fmt::Text => text(v),
        Fmt::Bytes => match text(v).parse::<u64>() {
            Ok(n) => human_bytes(n),
            Err(_) => text(v),
        },
        Fmt::Ref(kind) => match v.and_then(Value::as_str) {
            Some(id) => names.name(api, kind, id).await,
            None => String::new(),
        },
        Fmt::Version => match v {
            Some(v) => format!("{}.{}", text(v.get("major")), text(v.get("minor"))),
            None => String::new(),
        },
        Fmt::Cpus => match v {
            Some(t) => {
                let n = |k: &str| text(t.get(k)).parse::<u64>().unwrap_or(1);
                (n("sockets") * n("cores") * n("threads")).to_string()
            }
            None => String::new(),
        },
        Fmt::List => match v {
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    // A range: its ends.
                    Value::Object(m) => m.values().map(|x| text(Some(x))).collect::<Vec<_>>().join("-"),
                    other => text(Some(other)),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => text(other),
        },
    }
}

/// Aligned columns with a header line.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            if i + 1 < widths.len() {
                l.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count()));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

pub async fn print_list(api: &Api, kind: &'static Kind, items: &[Value], out: Output) -> anyhow::Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&Value::Array(items.to_vec()))?),
        Output::Table => {
            let mut names = Names::default();
            let mut rows = Vec::with_capacity(items.len());
            for it in items {
                let mut r = Vec::with_capacity(kind.cols.len());
                for c in kind.cols {
                    r.push(cell(api, &mut names, it, c.path, c.fmt).await);
                }
                rows.push(r);
            }
            let headers: Vec<&str> = kind.cols.iter().map(|c| c.header).collect();
            print!("{}", table(&headers, &rows));
        }
    }
    Ok(())
}

/// Every scalar of an object as `dotted.path = value`, links and hrefs left out.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "link" || k == "href" || k == "actions" {
                    continue;
                }
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::Null => {}
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// One object: the kind's columns first (references by name), then every other field.
pub async fn print_one(api: &Api, kind: &'static Kind, obj: &Value, out: Output) -> anyhow::Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(obj)?),
        Output::Table => {
            let mut names = Names::default();
            let mut rows = Vec::new();
            for c in kind.cols {
                rows.push(vec![
                    c.header.to_ascii_lowercase(),
                    cell(api, &mut names, obj, c.path, c.fmt).await,
                ]);
            }
            let mut all = Vec::new();
            flatten("", obj, &mut all);
            let shown: Vec<&str> = kind.cols.iter().map(|c| c.path).collect();
            for (k, v) in all {
                if !shown.contains(&k.as_str()) {
                    rows.push(vec![k, v]);
                }
            }
            let t = table(&["FIELD", "VALUE"], &rows);
            // The header line is noise for a single object.
            print!("{}", t.split_once('\n').map(|x| x.1).unwrap_or(""));
        }
    }
    Ok(())
}

/// The result of an action or removal: JSON, or one line of text.
pub fn print_done(out: Output, what: &str, obj: Option<&Value>) -> anyhow::Result<()> {
    match out {
        Output::Json => {
            let v = obj
                .cloned()
                .unwrap_or_else(|| serde_json::json!({ "status": "complete" }));
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => println!("{what}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_readable() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(268_435_456), "256 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5 GiB");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["NAME", "STATUS"],
            &[vec!["a".into(), "up".into()], vec!["longer".into(), "".into()]],
        );
        assert_eq!(t, "NAME    STATUS\na       up\nlonger\n");
    }

    #[test]
    fn flattening_skips_links() {
        let v = serde_json::json!({"name": "x", "href": "/h", "link": [{"rel": "a"}],
            "cpu": {"topology": {"cores": "2"}}, "l": ["a", "b"]});
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["cpu.topology.cores", "l[0]", "l[1]", "name"]);
    }
}
