//! oVirt's search language (`search=` on collections), translated into typed list filters.
//!
//! Grammar (keywords case-insensitive, values bare or double-quoted with `\"` escapes, `*` a
//! wildcard in text values):
//!
//! ```text
//! query  := [Type ":"] [conds ("or" conds)*] ["sortby" key ["asc"|"desc"] ("," key ["asc"|"desc"])*] ["page" N]
//! conds  := cond ("and" cond)*
//! cond   := field op value        op := "=" | "!=" | "<" | ">" | "<=" | ">="
//! field  := name ("." name)*      (storage.name, cluster.id, host.name …)
//! ```
//!
//! Each collection says which fields and operators it understands; anything else is a 400
//! fault naming the field, never a silently ignored condition (which would return too much).
//! `and` binds tighter than `or`, as in SQL (oVirt's search writes SQL): `a and b or c` is
//! `(a and b) or c`; each `or` alternative becomes a filter of its own.

use crate::db::{ListQuery, Ref, SortDir, TextMatch};

use super::fault::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    /// Lowercase, dotted (`storage.name`).
    pub field: String,
    pub op: Op,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    /// Alternatives (`or`), each a conjunction (`and`); none: everything.
    pub conds: Vec<Vec<Cond>>,
    pub sort: Vec<(String, SortDir)>,
    pub page: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Quoted(String),
    Op(Op),
    Comma,
    Colon,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(format!("search: {}", msg.into()))
}

fn tokenize(s: &str) -> Result<Vec<Tok>, ApiError> {
    let mut out = Vec::new();
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '"' => {
                let mut v = String::new();
                i += 1;
                loop {
                    match cs.get(i) {
                        None => return Err(bad("a quoted value is not closed")),
                        Some('\\') if matches!(cs.get(i + 1), Some('"') | Some('\\')) => {
                            v.push(cs[i + 1]);
                            i += 2;
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            v.push(c);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Quoted(v));
            }
            '=' => {
                out.push(Tok::Op(Op::Eq));
                i += 1;
            }
            '!' if cs.get(i + 1) == Some(&'=') => {
                out.push(Tok::Op(Op::Ne));
                i += 2;
            }
            '<' | '>' => {
                let eq = cs.get(i + 1) == Some(&'=');
                out.push(Tok::Op(match (c, eq) {
                    ('<', false) => Op::Lt,
                    ('<', true) => Op::Le,
                    ('>', false) => Op::Gt,
                    _ => Op::Ge,
                }));
                i += if eq { 2 } else { 1 };
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            ':' => {
                out.push(Tok::Colon);
                i += 1;
            }
            _ => {
                let start = i;
                while i < cs.len()
                    && !cs[i].is_whitespace()
                    && !matches!(cs[i], '=' | '!' | '<' | '>' | ',' | '"' | ':')
                {
                    i += 1;
                }
                if i == start {
                    return Err(bad(format!("unexpected character {c:?}")));
                }
                out.push(Tok::Word(cs[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

fn is_kw(t: Option<&Tok>, kw: &str) -> bool {
    matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
}

/// Parses a `search=` value (already URL-decoded, `+` already a space).
pub fn parse(s: &str) -> Result<Search, ApiError> {
    let toks = tokenize(s)?;
    let mut p = 0;
    let mut out = Search::default();
    // "Vms: name=x" — the type prefix of the admin portal's search box.
    if matches!(
        (toks.first(), toks.get(1)),
        (Some(Tok::Word(_)), Some(Tok::Colon))
    ) {
        p = 2;
    }
    let mut need_cond: Option<&str> = None;
    let mut conj: Vec<Cond> = Vec::new();
    while p < toks.len() {
        if is_kw(toks.get(p), "sortby") || is_kw(toks.get(p), "page") {
            break;
        }
        for kw in ["and", "or"] {
            if is_kw(toks.get(p), kw) {
                return Err(bad(format!("'{kw}' must follow a condition")));
            }
        }
        let field = match &toks[p] {
            Tok::Word(w) => w.to_ascii_lowercase(),
            t => return Err(bad(format!("expected a field name, found {t:?}"))),
        };
        let op = match toks.get(p + 1) {
            Some(Tok::Op(o)) => *o,
            _ => return Err(bad(format!("expected an operator after {field}"))),
        };
        let value = match toks.get(p + 2) {
            Some(Tok::Word(w)) | Some(Tok::Quoted(w)) => w.clone(),
            _ => return Err(bad(format!("expected a value after {field}"))),
        };
        conj.push(Cond { field, op, value });
        p += 3;
        need_cond = None;
        if is_kw(toks.get(p), "and") {
            p += 1;
            need_cond = Some("and");
        } else if is_kw(toks.get(p), "or") {
            p += 1;
            need_cond = Some("or");
            out.conds.push(std::mem::take(&mut conj));
        }
    }
    if let Some(kw) = need_cond {
        return Err(bad(format!("'{kw}' must be followed by a condition")));
    }
    if !conj.is_empty() {
        out.conds.push(conj);
    }
    if is_kw(toks.get(p), "sortby") {
        p += 1;
        loop {
            let key = match toks.get(p) {
                Some(Tok::Word(w)) => w.to_ascii_lowercase(),
                _ => return Err(bad("sortby needs a field")),
            };
            p += 1;
            let dir = if is_kw(toks.get(p), "desc") {
                p += 1;
                SortDir::Desc
            } else {
                if is_kw(toks.get(p), "asc") {
                    p += 1;
                }
                SortDir::Asc
            };
            out.sort.push((key, dir));
            if toks.get(p) == Some(&Tok::Comma) {
                p += 1;
                continue;
            }
            break;
        }
    }
    if is_kw(toks.get(p), "page") {
        let n = match toks.get(p + 1) {
            Some(Tok::Word(w)) => w.parse::<u32>().ok().filter(|n| *n >= 1),
            _ => None,
        };
        out.page = Some(n.ok_or_else(|| bad("page needs a number from 1"))?);
        p += 2;
    }
    if p < toks.len() {
        return Err(bad(format!("unexpected {:?}", toks[p])));
    }
    Ok(out)
}

/// What list parameters besides `search=` say.
#[derive(Debug, Clone, Copy)]
pub struct ListParams {
    pub max: Option<u32>,
    pub case_sensitive: bool,
}

/// Translates a search for one collection: `cond` handles each condition (returning
/// `Ok(false)` for a field it does not know), `sort` maps sort keys. Without `sortby` the
/// collection's `"name"` order applies when it has one (stable listings, as oVirt's).
pub fn translate<F: Default, K>(
    s: &Search,
    params: ListParams,
    what: &str,
    mut cond: impl FnMut(&mut F, &Cond, &Ctx) -> Result<bool, ApiError>,
    sort: impl Fn(&str) -> Option<K>,
) -> Result<ListQuery<F, K>, ApiError> {
    let ctx = Ctx {
        case_sensitive: params.case_sensitive,
    };
    let mut filters = Vec::with_capacity(s.conds.len());
    for conj in &s.conds {
        let mut filter = F::default();
        for c in conj {
            if !cond(&mut filter, c, &ctx)? {
                return Err(bad(format!(
                    "{what} cannot be searched by {} {}",
                    c.field,
                    op_str(c.op)
                )));
            }
        }
        filters.push(filter);
    }
    let mut filters = filters.into_iter();
    let mut q = ListQuery::filtered(filters.next().unwrap_or_default());
    q.or = filters.collect();
    if s.sort.is_empty() {
        if let Some(k) = sort("name") {
            q.sort.push((k, SortDir::Asc));
        }
    }
    for (k, d) in &s.sort {
        let key = sort(k).ok_or_else(|| bad(format!("{what} cannot be sorted by {k}")))?;
        q.sort.push((key, *d));
    }
    q.limit = params.max;
    q.page = s.page;
    Ok(q)
}

fn op_str(o: Op) -> &'static str {
    match o {
        Op::Eq => "=",
        Op::Ne => "!=",
        Op::Lt => "<",
        Op::Gt => ">",
        Op::Le => "<=",
        Op::Ge => ">=",
    }
}

/// Helpers for the condition callbacks.
pub struct Ctx {
    case_sensitive: bool,
}

impl Ctx {
    /// A text match for an `=` condition (wildcards allowed).
    pub fn text(&self, c: &Cond) -> Result<TextMatch, ApiError> {
        self.eq(c)?;
        let m = TextMatch::new(c.value.clone());
        Ok(if self.case_sensitive {
            m
        } else {
            m.case_insensitive()
        })
    }

    pub fn eq(&self, c: &Cond) -> Result<(), ApiError> {
        if c.op != Op::Eq {
            return Err(bad(format!("{} supports only =", c.field)));
        }
        Ok(())
    }

    /// An enum value (`status=Up` and `status=up` alike).
    pub fn value<T: std::str::FromStr>(&self, c: &Cond) -> Result<T, ApiError> {
        self.eq(c)?;
        c.value
            .to_ascii_lowercase()
            .parse()
            .map_err(|_| bad(format!("{} has no value {:?}", c.field, c.value)))
    }

    /// A reference: `x=name`, `x.name=name`, `x.id=uuid`.
    pub fn reference<Id: std::str::FromStr>(
        &self,
        c: &Cond,
        base: &str,
    ) -> Result<Option<Ref<Id>>, ApiError> {
        let Some(rest) = c.field.strip_prefix(base) else {
            return Ok(None);
        };
        match rest {
            "" | ".name" => Ok(Some(Ref::Name(self.text(c)?))),
            ".id" => {
                self.eq(c)?;
                let id = c
                    .value
                    .parse()
                    .map_err(|_| bad(format!("{} is not an id: {:?}", c.field, c.value)))?;
                Ok(Some(Ref::Id(id)))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_clients_send() {
        let s =
            parse(r#"name="my vm" and status=Up and storage.name=data1 sortby name desc page 2"#).unwrap();
        assert_eq!(
            s.conds,
            vec![vec![
                Cond {
                    field: "name".into(),
                    op: Op::Eq,
                    value: "my vm".into()
                },
                Cond {
                    field: "status".into(),
                    op: Op::Eq,
                    value: "Up".into()
                },
                Cond {
                    field: "storage.name".into(),
                    op: Op::Eq,
                    value: "data1".into()
                },
            ]]
        );
        assert_eq!(s.sort, vec![("name".to_string(), SortDir::Desc)]);
        assert_eq!(s.page, Some(2));
        let s = parse("type=885 and severity>normal sortby time asc page 2").unwrap();
        assert_eq!(s.conds[0][1].op, Op::Gt);
        assert_eq!(s.sort, vec![("time".to_string(), SortDir::Asc)]);
        let s = parse("Vms: name=web*").unwrap();
        assert_eq!(s.conds[0][0].value, "web*");
        assert_eq!(parse("").unwrap(), Search::default());
        let s = parse(r#"name="a \"q\"""#).unwrap();
        assert_eq!(s.conds[0][0].value, "a \"q\"");
        let s = parse("correlation_id=abc-123").unwrap();
        assert_eq!(s.conds[0][0].value, "abc-123");
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let s = parse("name=a and status=up or name=b OR cluster=c sortby name").unwrap();
        let fields: Vec<Vec<(&str, &str)>> = s
            .conds
            .iter()
            .map(|c| c.iter().map(|c| (c.field.as_str(), c.value.as_str())).collect())
            .collect();
        assert_eq!(
            fields,
            vec![
                vec![("name", "a"), ("status", "up")],
                vec![("name", "b")],
                vec![("cluster", "c")]
            ]
        );
        assert_eq!(s.sort.len(), 1);
    }

    #[test]
    fn a_misplaced_keyword_is_named() {
        let e = parse("or name=a").unwrap_err().detail;
        assert!(e.contains("'or' must follow a condition"), "{e}");
        let e = parse("name=a or").unwrap_err().detail;
        assert!(e.contains("'or' must be followed by a condition"), "{e}");
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        for bad in [
            "name=a or",
            "or name=a",
            "name=a or and name=b",
            "name=a and or name=b",
            "name=",
            "name",
            "name=a and",
            "name=\"x",
            "page 0",
            "page x",
            "sortby",
            "name=a b",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
