//! HTML building blocks: escaping, the page layout, tables, status badges, forms and figures.
//!
//! Invariant: every value from the database or the user reaches the page through [`esc`] (or
//! [`Html::text`]); only literals of this module and the page modules are written raw. Pages
//! carry no inline script or style (the Content-Security-Policy forbids them): behaviour comes
//! from `portal.js` through `data-*` attributes, and bars are `<progress>`/`<meter>` elements.

use std::fmt::{Display, Write as _};

use crate::time::Timestamp;

/// Escapes text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    esc_into(&mut o, s);
    o
}

pub fn esc_into(o: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
}

/// An HTML fragment under construction.
#[derive(Debug, Default)]
pub struct Html {
    pub buf: String,
}

impl Html {
    pub fn new() -> Self {
        Html {
            buf: String::with_capacity(8192),
        }
    }
    /// Trusted markup (literals of the portal).
    pub fn raw(&mut self, s: &str) -> &mut Self {
        self.buf.push_str(s);
        self
    }
    /// Untrusted text, escaped.
    pub fn text(&mut self, s: impl Display) -> &mut Self {
        let s = s.to_string();
        esc_into(&mut self.buf, &s);
        self
    }
    pub fn finish(self) -> String {
        self.buf
    }

    /// `<h1>` with optional right-hand actions.
    /// A list page's heading; its subtitle (counts) is a region, so it is re-rendered with
    /// the page's other regions when the live poller sees the page's sets change.
    pub fn heading(&mut self, title: &str, sub: Option<&str>) -> &mut Self {
        self.raw("<div class=\"head\"><h1>").text(title).raw("</h1>");
        if let Some(s) = sub {
            self.raw("<span class=\"sub\" data-region=\"head-sub\">")
                .text(s)
                .raw("</span>");
        }
        self.raw("</div>")
    }

    /// Opens a detail page's head with its title (`<kind> <name>`); the caller adds what
    /// follows the title (a status badge…) and closes it with `</div>`.
    pub fn head_open(&mut self, title: impl Display) -> &mut Self {
        self.raw("<div class=\"head\"><h1>").text(title).raw("</h1>")
    }

    pub fn section(&mut self, title: &str) -> &mut Self {
        self.raw("<h2>").text(title).raw("</h2>")
    }

    /// Opens a table with header cells; `live_set` names the collection whose membership
    /// the live poller watches (rows then carry `data-id`).
    pub fn table_open(&mut self, id: &str, headers: &[&str], live_set: Option<&str>) -> &mut Self {
        self.raw("<table id=\"").text(id).raw("\"");
        if let Some(s) = live_set {
            self.raw(" data-live-set=\"").text(s).raw("\"");
        }
        self.raw("><thead><tr>");
        for h in headers {
            self.raw("<th>").text(h).raw("</th>");
        }
        self.raw("</tr></thead><tbody>")
    }

    pub fn table_close(&mut self, empty_text: &str, cols: usize, empty: bool) -> &mut Self {
        if empty {
            let _ = write!(self.buf, "<tr class=\"empty\"><td colspan=\"{cols}\">");
            self.text(empty_text).raw("</td></tr>");
        }
        self.raw("</tbody></table>")
    }

    pub fn row_open(&mut self, id: Option<&str>) -> &mut Self {
        match id {
            Some(id) => self.raw("<tr data-id=\"").text(id).raw("\">"),
            None => self.raw("<tr>"),
        }
    }

    pub fn cell(&mut self, v: impl Display) -> &mut Self {
        self.raw("<td>").text(v).raw("</td>")
    }

    pub fn cell_num(&mut self, v: impl Display) -> &mut Self {
        self.raw("<td class=\"num\">").text(v).raw("</td>")
    }

    pub fn cell_link(&mut self, href: &str, v: impl Display) -> &mut Self {
        self.raw("<td><a href=\"")
            .text(href)
            .raw("\">")
            .text(v)
            .raw("</a></td>")
    }

    /// A status badge; `live` (`vm:<id>`, `host:<id>`…) lets the poller update it in place.
    pub fn badge(&mut self, status: impl Display, live: Option<&str>) -> &mut Self {
        let s = status.to_string();
        self.raw("<span class=\"st st-").text(&s).raw("\"");
        if let Some(l) = live {
            self.raw(" data-live=\"").text(l).raw("\"");
        }
        self.raw(">").text(&s).raw("</span>")
    }

    /// A definition list of label/value pairs (values escaped).
    pub fn facts(&mut self, items: &[(&str, String)]) -> &mut Self {
        let linked: Vec<(&str, String, Option<String>)> =
            items.iter().map(|(k, v)| (*k, v.clone(), None)).collect();
        self.facts_linked(&linked)
    }

    /// Facts whose values may link to the object they name.
    pub fn facts_linked(&mut self, items: &[(&str, String, Option<String>)]) -> &mut Self {
        self.raw("<dl class=\"facts\">");
        for (k, v, href) in items {
            self.raw("<dt>").text(k).raw("</dt><dd>");
            match href {
                Some(href) => self.raw("<a href=\"").text(href).raw("\">").text(v).raw("</a>"),
                None => self.text(v),
            };
            self.raw("</dd>");
        }
        self.raw("</dl>")
    }

    /// `<meter>` for a used/total figure, with the numbers beside it.
    pub fn usage(&mut self, used: u64, total: u64, live: Option<&str>) -> &mut Self {
        let _ = write!(
            self.buf,
            "<span class=\"usage\"><meter min=\"0\" max=\"{total}\" low=\"{}\" high=\"{}\" optimum=\"0\" value=\"{used}\"",
            total / 10 * 7,
            total / 10 * 9
        );
        if let Some(l) = live {
            self.raw(" data-live-meter=\"").text(l).raw("\"");
        }
        self.raw("></meter> <span class=\"usage-text\"");
        if let Some(l) = live {
            self.raw(" data-live-text=\"").text(l).raw("\"");
        }
        self.raw(">")
            .text(format!("{} / {}", bytes(used), bytes(total)))
            .raw("</span></span>")
    }

    /// A form that POSTs one action; `confirm` asks first (destructive actions).
    pub fn action(
        &mut self,
        ctx: &FormCtx,
        url: &str,
        label: &str,
        confirm: Option<&str>,
        class: &str,
    ) -> &mut Self {
        self.form_open(ctx, url, confirm, "inline");
        self.raw("<button type=\"submit\" class=\"")
            .text(class)
            .raw("\">")
            .text(label)
            .raw("</button></form>")
    }

    /// Opens a POST form with the CSRF token; close it with `</form>`.
    pub fn form_open(&mut self, ctx: &FormCtx, url: &str, confirm: Option<&str>, class: &str) -> &mut Self {
        self.raw("<form method=\"post\" class=\"")
            .text(class)
            .raw("\" action=\"")
            .text(url)
            .raw("\"");
        if let Some(c) = confirm {
            self.raw(" data-confirm=\"").text(c).raw("\"");
        }
        self.raw("><input type=\"hidden\" name=\"csrf\" value=\"")
            .text(&ctx.csrf)
            .raw("\"><input type=\"hidden\" name=\"back\" value=\"")
            .text(&ctx.back)
            .raw("\">")
    }

    pub fn input(&mut self, label: &str, name: &str, kind: &str, value: &str, extra: &str) -> &mut Self {
        self.raw("<label>")
            .text(label)
            .raw(" <input type=\"")
            .text(kind)
            .raw("\" name=\"")
            .text(name)
            .raw("\" value=\"")
            .text(value)
            .raw("\" ")
            .raw(extra)
            .raw("></label>")
    }

    /// A `<select>` of `(value, label)` options.
    pub fn select(
        &mut self,
        label: &str,
        name: &str,
        options: &[(String, String)],
        selected: Option<&str>,
    ) -> &mut Self {
        self.raw("<label>")
            .text(label)
            .raw(" <select name=\"")
            .text(name)
            .raw("\">");
        for (v, l) in options {
            self.raw("<option value=\"").text(v).raw("\"");
            if selected == Some(v.as_str()) {
                self.raw(" selected");
            }
            self.raw(">").text(l).raw("</option>");
        }
        self.raw("</select></label>")
    }

    /// A chart the script draws from `/portal/api/history?<kind>=<id>`.
    pub fn chart(&mut self, kind: &str, id: &str, title: &str) -> &mut Self {
        self.raw("<figure class=\"chart\" data-chart=\"")
            .text(kind)
            .raw("\" data-id=\"")
            .text(id)
            .raw("\"><figcaption>")
            .text(title)
            .raw(" <span class=\"legend\"><i class=\"l-cpu\"></i>CPU % <i class=\"l-mem\"></i>memory %</span></figcaption>")
            .raw("<svg viewBox=\"0 0 300 100\" preserveAspectRatio=\"none\" role=\"img\"></svg>")
            .raw("<div class=\"chart-now\"></div></figure>")
    }
}

/// What every form needs: the CSRF token and where to go back to without script.
#[derive(Debug, Clone)]
pub struct FormCtx {
    pub csrf: String,
    pub back: String,
}

pub use crate::model::bytes;

/// `2024-05-01 12:03:04Z`.
pub fn time(t: Timestamp) -> String {
    let s = t.to_rfc3339();
    let s = s.replacen('T', " ", 1);
    match s.find('.') {
        Some(dot) => format!("{}Z", &s[..dot]),
        None => s,
    }
}

/// The page around a body: header, navigation, the confirmation dialog and the script.
pub fn layout(title: &str, active: &str, user: Option<&str>, csrf: Option<&str>, body: &str) -> String {
    const NAV: &[(&str, &str, &str)] = &[
        ("dashboard", "/portal/", "Dashboard"),
        ("datacenters", "/portal/datacenters", "Data centers"),
        ("clusters", "/portal/clusters", "Clusters"),
        ("hosts", "/portal/hosts", "Hosts"),
        ("storagedomains", "/portal/storagedomains", "Storage"),
        ("disks", "/portal/disks", "Disks"),
        ("vms", "/portal/vms", "VMs"),
        ("snapshots", "/portal/snapshots", "Snapshots"),
        ("templates", "/portal/templates", "Templates"),
        ("jobs", "/portal/jobs", "Jobs"),
        ("events", "/portal/events", "Events"),
    ];
    let mut h = Html::new();
    h.raw("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<title>")
        .text(title)
        .raw(" · oxvirt</title><link rel=\"stylesheet\" href=\"/portal/static/portal.css\">");
    if let Some(c) = csrf {
        h.raw("<meta name=\"csrf\" content=\"").text(c).raw("\">");
    }
    h.raw("<link rel=\"icon\" href=\"/portal/static/icon.svg\" type=\"image/svg+xml\">")
        .raw("<script src=\"/portal/static/portal.js\" defer></script></head><body data-page=\"")
        .text(active)
        .raw("\"><header><a class=\"brand\" href=\"/portal/\">ox<b>virt</b></a>");
    if let Some(u) = user {
        h.raw("<nav>");
        for (key, href, label) in NAV {
            h.raw("<a href=\"").raw(href).raw("\"");
            if *key == active {
                h.raw(" class=\"on\"");
            }
            h.raw(">").raw(label).raw("</a>");
        }
        h.raw("</nav><div class=\"user\"><span class=\"live-dot\" title=\"live updates\"></span>")
            .text(u);
        if let Some(c) = csrf {
            h.raw("<form method=\"post\" action=\"/portal/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"")
                .text(c)
                .raw("\"><button type=\"submit\" class=\"link\">Log out</button></form>");
        }
        h.raw("</div>");
    }
    h.raw("</header><main id=\"main\">")
        .raw(body)
        .raw("</main><div id=\"toasts\" aria-live=\"polite\"></div>")
        .raw("<dialog id=\"confirm\"><form method=\"dialog\"><p class=\"confirm-text\"></p><div class=\"buttons\">")
        .raw("<button value=\"cancel\" class=\"secondary\" id=\"confirm-cancel\">Cancel</button> ")
        .raw("<button value=\"ok\" class=\"danger\" id=\"confirm-ok\">Confirm</button></div></form></dialog>")
        .raw("</body></html>");
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(esc("<a href='x'>\"&"), "&lt;a href=&#39;x&#39;&gt;&quot;&amp;");
        let mut h = Html::new();
        h.badge("up\"><script>", Some("vm:1"));
        assert!(!h.buf.contains("<script>"), "{}", h.buf);
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1 << 30), "1 GiB");
        assert_eq!(bytes(1536 << 20), "1.5 GiB");
        assert_eq!(bytes(200 << 20), "200 MiB");
        assert_eq!(
            time(Timestamp::from_millis(1_700_000_000_123)),
            "2023-11-14 22:13:20Z"
        );
    }
}
