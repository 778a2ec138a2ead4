//! Listing: typed filters, sorting and paging, the target of the REST search translation.
//!
//! The REST layer turns `search=name=web* and status=up sortby name desc page 2` with `max=10`
//! into a [`ListQuery`] of the collection's filter (e.g. [`VmFilter`](super::VmFilter)) with
//! `name: Some(TextMatch::new("web*"))`, `status: vec![VmStatus::Up]`, `sort: [(Name, Desc)]`,
//! `limit: Some(10)`, `page: Some(2)`. Every field of a filter is an AND; a list of values
//! inside one field is an OR; `name=a or name=b` becomes a second filter in [`ListQuery::or`]
//! (a row matches if it matches any). Results are always in a total order (the id breaks ties),
//! so pages never overlap or skip rows.

use super::sql::Sql;
use super::Backend;

/// Rows per page when a page is asked for without a limit (oVirt's `SearchResultsLimit`).
pub const DEFAULT_PAGE_SIZE: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortDir {
    #[default]
    Asc,
    Desc,
}

/// A text condition as oVirt's search has it: `*` matches any run of characters; no `*`
/// means equality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextMatch {
    pub pattern: String,
    pub case_sensitive: bool,
}

impl TextMatch {
    /// Case-sensitive, as the REST API's `case_sensitive` defaults to.
    pub fn new(pattern: impl Into<String>) -> Self {
        TextMatch {
            pattern: pattern.into(),
            case_sensitive: true,
        }
    }
    pub fn case_insensitive(mut self) -> Self {
        self.case_sensitive = false;
        self
    }
    pub fn is_pattern(&self) -> bool {
        self.pattern.contains('*')
    }
}

impl From<&str> for TextMatch {
    fn from(s: &str) -> Self {
        TextMatch::new(s)
    }
}

/// A reference to another object, by id or by name (`datacenter=Default`, `storage.name=x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref<Id> {
    Id(Id),
    Name(TextMatch),
}

impl<Id> Ref<Id> {
    pub fn name(n: impl Into<String>) -> Self {
        Ref::Name(TextMatch::new(n))
    }
}

/// A filter, a sort and a page of one collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery<F, K> {
    pub filter: F,
    /// More filters, each an alternative to `filter` (`search=… or …`).
    pub or: Vec<F>,
    /// Applied in order; the id is always the last key.
    pub sort: Vec<(K, SortDir)>,
    /// At most this many rows (`max=`).
    pub limit: Option<u32>,
    /// 1-based page of `limit` rows (`page N`).
    pub page: Option<u32>,
}

impl<F: Default, K> Default for ListQuery<F, K> {
    fn default() -> Self {
        ListQuery {
            filter: F::default(),
            or: Vec::new(),
            sort: Vec::new(),
            limit: None,
            page: None,
        }
    }
}

impl<F: Default, K> ListQuery<F, K> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<F, K> ListQuery<F, K> {
    pub fn filtered(filter: F) -> Self {
        ListQuery {
            filter,
            or: Vec::new(),
            sort: Vec::new(),
            limit: None,
            page: None,
        }
    }
    /// The filter and its alternatives: what a condition every row must meet is added to.
    pub fn filters_mut(&mut self) -> impl Iterator<Item = &mut F> {
        std::iter::once(&mut self.filter).chain(self.or.iter_mut())
    }
    pub fn sort_by(mut self, key: K, dir: SortDir) -> Self {
        self.sort.push((key, dir));
        self
    }
    pub fn limit(mut self, n: u32) -> Self {
        self.limit = Some(n);
        self
    }
    pub fn page(mut self, n: u32) -> Self {
        self.page = Some(n);
        self
    }
}

/// Builds `WHERE a AND b …` onto a query.
pub(crate) struct Where<'s> {
    pub sql: &'s mut Sql,
    pub backend: Backend,
    any: bool,
    /// Inside one alternative of `(…) OR (…)`: the first condition has no keyword before it.
    nested: bool,
}

impl<'s> Where<'s> {
    pub fn new(sql: &'s mut Sql, backend: Backend) -> Self {
        Where {
            sql,
            backend,
            any: false,
            nested: false,
        }
    }

    /// Starts the next condition; returns the query to write it into.
    pub fn and(&mut self) -> &mut Sql {
        self.sql.push(match (self.any, self.nested) {
            (true, _) => " AND ",
            (false, false) => " WHERE ",
            (false, true) => "",
        });
        self.any = true;
        self.sql
    }

    /// Writes the conditions of `lq`'s filter with `write`, or, when the query has
    /// alternatives, `WHERE ((filter) OR (alternative) …)`; an alternative without conditions
    /// matches every row.
    pub fn each<F, K>(&mut self, lq: &ListQuery<F, K>, write: impl Fn(&mut Where<'_>, &F)) {
        if lq.or.is_empty() {
            write(self, &lq.filter);
            return;
        }
        let prefix = if self.any { " AND ((" } else { " WHERE ((" };
        self.sql.push(prefix);
        for (i, f) in std::iter::once(&lq.filter).chain(&lq.or).enumerate() {
            if i > 0 {
                self.sql.push(") OR (");
            }
            let mut inner = Where {
                sql: &mut *self.sql,
                backend: self.backend,
                any: false,
                nested: true,
            };
            write(&mut inner, f);
            if !inner.any {
                inner.sql.push("1 = 1");
            }
        }
        self.sql.push("))");
        self.any = true;
    }

    pub fn text(&mut self, col: &str, m: &Option<TextMatch>) {
        if let Some(m) = m {
            let backend = self.backend;
            text_condition(self.and(), backend, col, m);
        }
    }

    pub fn eq(&mut self, col: &str, v: &Option<impl ToString>) {
        if let Some(v) = v {
            self.and().push(col).push(" = ").arg(v.to_string());
        }
    }

    pub fn eq_int(&mut self, col: &str, v: Option<i64>) {
        if let Some(v) = v {
            self.and().push(col).push(" = ").arg(v);
        }
    }

    /// `col IN (…)`; an empty list is no condition.
    pub fn any_of<T: ToString>(&mut self, col: &str, vs: &[T]) {
        if vs.is_empty() {
            return;
        }
        let sql = self.and();
        sql.push(col).push(" IN (");
        for (i, v) in vs.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.arg(v.to_string());
        }
        sql.push(")");
    }

    /// `col` refers to a row of `table` given by id or by name.
    pub fn reference<Id: ToString>(&mut self, col: &str, table: &str, r: &Option<Ref<Id>>) {
        match r {
            None => {}
            Some(Ref::Id(id)) => {
                self.and().push(col).push(" = ").arg(id.to_string());
            }
            Some(Ref::Name(m)) => {
                let backend = self.backend;
                let sql = self.and();
                sql.push(col)
                    .push(" IN (SELECT id FROM ")
                    .push(table)
                    .push(" WHERE ");
                text_condition(sql, backend, "name", m);
                sql.push(")");
            }
        }
    }

    /// An arbitrary condition with a reference resolved to an id subquery: `{ids}` in `cond`
    /// is replaced by `(SELECT id FROM table WHERE …)` or the bound id.
    pub fn reference_in(&mut self, cond: &str, table: &str, r: &Option<Ref<impl ToString>>) {
        let Some(r) = r else { return };
        let (before, after) = cond.split_once("{ids}").expect("condition has {ids}");
        let backend = self.backend;
        let sql = self.and();
        sql.push(before);
        match r {
            Ref::Id(id) => {
                sql.push("(").arg(id.to_string()).push(")");
            }
            Ref::Name(m) => {
                sql.push("(SELECT id FROM ").push(table).push(" WHERE ");
                text_condition(sql, backend, "name", m);
                sql.push(")");
            }
        }
        sql.push(after);
    }
}

/// Appends the condition for `col` matching `m`.
pub(crate) fn text_condition(sql: &mut Sql, backend: Backend, col: &str, m: &TextMatch) {
    match (m.is_pattern(), m.case_sensitive) {
        (false, true) => {
            sql.push(col).push(" = ").arg(m.pattern.clone());
        }
        (false, false) => {
            sql.push("LOWER(")
                .push(col)
                .push(") = ")
                .arg(m.pattern.to_lowercase());
        }
        (true, false) => {
            sql.push("LOWER(")
                .push(col)
                .push(") LIKE ")
                .arg(like_pattern(&m.pattern.to_lowercase()))
                .push(" ESCAPE '\\'");
        }
        (true, true) => match backend {
            // SQLite's LIKE ignores ASCII case; GLOB does not.
            Backend::Sqlite => {
                sql.push(col).push(" GLOB ").arg(glob_pattern(&m.pattern));
            }
            Backend::Postgres => {
                sql.push(col)
                    .push(" LIKE ")
                    .arg(like_pattern(&m.pattern))
                    .push(" ESCAPE '\\'");
            }
        },
    }
}

fn like_pattern(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 4);
    for c in p.chars() {
        match c {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn glob_pattern(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 4);
    for c in p.chars() {
        match c {
            '?' => out.push_str("[?]"),
            '[' => out.push_str("[[]"),
            c => out.push(c),
        }
    }
    out
}

/// Appends `ORDER BY …, <tiebreak>` and the page's `LIMIT/OFFSET`.
pub(crate) fn order_and_page<F, K>(
    sql: &mut Sql,
    q: &ListQuery<F, K>,
    column: impl Fn(&K) -> &'static str,
    tiebreak: &str,
) {
    sql.push(" ORDER BY ");
    for (k, dir) in &q.sort {
        sql.push(column(k)).push(match dir {
            SortDir::Asc => " ASC, ",
            SortDir::Desc => " DESC, ",
        });
    }
    sql.push(tiebreak);
    let limit = match (q.limit, q.page) {
        (Some(l), _) => Some(l),
        (None, Some(_)) => Some(DEFAULT_PAGE_SIZE),
        (None, None) => None,
    };
    if let Some(l) = limit {
        let offset = u64::from(q.page.unwrap_or(1).max(1) - 1) * u64::from(l);
        sql.push(&format!(" LIMIT {l} OFFSET {offset}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_translate_and_escape() {
        assert_eq!(like_pattern("we_b*%\\"), "we\\_b%\\%\\\\");
        assert_eq!(glob_pattern("a?[*"), "a[?][[]*");
    }

    #[test]
    fn alternatives_are_parenthesised_and_an_empty_one_matches_all() {
        let write = |w: &mut Where<'_>, f: &(Option<i64>, Option<i64>)| {
            w.eq_int("a", f.0);
            w.eq_int("b", f.1);
        };
        let mut s = Sql::new("SELECT 1 FROM t");
        let mut q: ListQuery<(Option<i64>, Option<i64>), ()> = ListQuery::filtered((Some(1), Some(2)));
        Where::new(&mut s, Backend::Sqlite).each(&q, write);
        assert_eq!(s.text, "SELECT 1 FROM t WHERE a = $1 AND b = $2");
        q.or = vec![(None, Some(3)), (None, None)];
        let mut s = Sql::new("SELECT 1 FROM t");
        Where::new(&mut s, Backend::Sqlite).each(&q, write);
        assert_eq!(
            s.text,
            "SELECT 1 FROM t WHERE ((a = $1 AND b = $2) OR (b = $3) OR (1 = 1))"
        );
    }

    #[test]
    fn paging_sql() {
        let mut s = Sql::new("SELECT 1");
        let q: ListQuery<(), &'static str> = ListQuery::filtered(())
            .sort_by("name", SortDir::Desc)
            .limit(10)
            .page(3);
        order_and_page(&mut s, &q, |k| k, "id");
        assert_eq!(s.text, "SELECT 1 ORDER BY name DESC, id LIMIT 10 OFFSET 20");
        let mut s = Sql::new("SELECT 1");
        let q: ListQuery<(), &'static str> = ListQuery::filtered(()).page(2);
        order_and_page(&mut s, &q, |k| k, "id");
        assert_eq!(s.text, "SELECT 1 ORDER BY id LIMIT 100 OFFSET 100");
    }
}
